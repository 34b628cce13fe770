"""scripts/step_profile.py: the kernel classes bench_train.py --profile splits a step's GPU time into
(the profiling itself needs CUDA and runs on the GPU machine)."""
from scripts.step_profile import CLASSES, format_table, kernel_class, split_by_class, tunedag_kernels


def test_tunedag_kernels_are_found_by_name_and_attention_sinks_count_as_attention():
    ours = tunedag_kernels()
    assert ours["_rms_norm_forward_kernel"] == "tunedag kernels"
    assert ours["_swiglu_backward_kernel"] == "tunedag kernels"
    assert ours["_cross_entropy_rows_kernel"] == "tunedag kernels"
    assert ours["_dkdv_kernel"] == "attention"  # kernels/sink_attention.py


def test_kernel_names_seen_on_the_h200_fall_in_their_classes():
    ours = {"_rope_kernel": "tunedag kernels"}
    assert kernel_class("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NNT", ours) == "matmul"
    assert kernel_class("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", ours) == "matmul"
    assert kernel_class("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<...>>", ours) == "matmul"
    assert kernel_class("void at::cuda::detail::grouped_mm_kernel<...>", ours) == "matmul"  # MoE experts
    assert kernel_class("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>", ours) == "attention"
    # as the H200 profile names it: CUTLASS types in the template arguments, still attention
    assert kernel_class("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128, "
                        "64, 128, 8, 2, 4, 2, false, cutlass::bfloat16_t>>", ours) == "attention"
    assert kernel_class("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128", ours) == "attention"
    assert kernel_class("triton_tem_fused_0", ours) == "attention"  # FlexAttention's compiled template
    assert kernel_class("Memcpy HtoD (Pinned -> Device)", ours) == "copies"
    assert kernel_class("_rope_kernel", ours) == "tunedag kernels"
    assert kernel_class("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", ours) \
        == "rest"
    assert kernel_class("_rms_layernorm_backward", ours) == "rest"  # another library's Triton kernel


def test_split_sums_each_class_per_step_and_the_time_no_kernel_ran():
    kernels_us = {"nvjet_a": 6000.0, "sm90_xmma_gemm_b": 2000.0, "flash_bwd": 3000.0, "_rope_kernel": 1000.0,
                  "Memcpy DtoH": 500.0, "elementwise": 1500.0}
    split = split_by_class(kernels_us, {"_rope_kernel": "tunedag kernels"}, steps=2, wall_s=0.010, top=2)
    assert split["step_ms"] == 5.0
    assert split["ms_per_step"] == {"matmul": 4.0, "attention": 1.5, "tunedag kernels": 0.5, "copies": 0.25,
                                    "rest": 0.75}
    assert split["no_kernel_ms"] == 0.0  # 7 ms of kernels in a 5 ms step: overlapping streams, clamped
    assert [k["kernel"] for k in split["longest"]] == ["nvjet_a", "flash_bwd"]
    slower = split_by_class(kernels_us, {}, steps=2, wall_s=0.020)
    assert slower["no_kernel_ms"] == 3.0 and slower["ms_per_step"]["rest"] == 1.25  # _rope_kernel not ours here
    table = format_table([{"variant": "ours_lora", "shape": "8b", "batch": 4, "profile": split}])
    assert all(c in table for c in CLASSES) and "ours_lora" in table
