"""The fate of every key of Axolotl's config schema that tunedag does not hold under the same name.

A key tunedag holds with the same meaning (``base_model``, ``lora_r``, ``learning_rate``, ...) is simply a
tunedag key; :mod:`tunedag.config.axolotl` translates the keys in ``TRANSLATED``. The rest are either
``IGNORED`` (accepted, with a one-line note saying why they change nothing here) or ``REFUSED`` (with what
tunedag does instead) when set to anything but null or false: a key that asks for nothing is never refused.
The groups' texts are those notes and refusals; README's "Coming from Axolotl" lists the same table.
"""
from __future__ import annotations

# Keys :mod:`tunedag.config.axolotl` translates into tunedag's, each with the tunedag key(s) it sets.
TRANSLATED: dict[str, str] = {
    "load_in_4bit": "adapter: qlora (LoRA over a 4-bit NF4 base)",
    "load_in_8bit": "no 8-bit base in tunedag: LoRA over the bf16 base (noted), or adapter: qlora for less memory",
    "lora_target_linear": "lora_target_modules: every linear projection of the decoder, with those listed",
    "gradient_checkpointing": "gradient_checkpointing; 'offload' also sets activation_offloading",
    "deepspeed": "train_engine: deepspeed, with the JSON as deepspeed_config",
    "fsdp": "train_engine: fsdp (FSDP2 per decoder layer)",
    "fsdp_config": "train_engine: fsdp; offload_params is refused (use train_engine: deepspeed with "
                   "deepspeed_offload)",
    "fsdp_version": "train_engine: fsdp (tunedag's fsdp is FSDP2)",
    "reward_model": "rl: reward",
    "process_reward_model": "rl: prm (a 2-label token classifier scoring each step of stepwise_supervised data)",
    "dpo_beta": "rl_beta",
    "pretraining_dataset": "one datasets entry: the hub split streamed only as far as max_steps reads it "
                           "(max_words), type: completion, packed (see tunedag/config/pretraining.py)",
    "save_total_limit": "keep_last_checkpoints",
    "use_wandb": "false: wandb_mode: disabled",
    "revision_of_model": "base_model_revision",
    "eval_strategy": "'epoch': evals_per_epoch: 1; 'no': no evaluation during training",
    "evaluation_strategy": "as eval_strategy",
    "bf16": "tunedag computes in bf16 on CUDA (fp32 on CPU); bf16: false with fp16: true is refused",
    "bfloat16": "as bf16",
    "val_set_size": "0: tunedag's evaluate stage needs held-out rows, so its default share 0.05 is kept (noted)",
    "model_config": "output_router_logits alone: tunedag adds a mixture-of-experts model's router "
                    "load-balancing loss as the model's config sets it (noted); other overrides are refused",
    "optimizer": "Axolotl's aliases adamw_8bit (adamw_bnb_8bit) and paged_adamw_32bit (adamw_torch: the same "
                 "update, unpaged) become tunedag's names; muon without adam_beta2 takes 0.95 (Axolotl's Muon)",
    "model_quantization_config": "Mxfp4Config with model_quantization_config_kwargs dequantize: true: tunedag "
                                 "loads an MXFP4 checkpoint's (gpt-oss's) experts dequantized to bf16 (noted); "
                                 "other quantization configs are refused",
    "model_quantization_config_kwargs": "with model_quantization_config",
    "lr_scheduler": "Axolotl's constant_with_warmup is tunedag's constant (the warmup, then a constant rate)",
    "num_labels": "1 with reward_model (the reward model's one score), 2 with process_reward_model (a step is "
                  "wrong or right); other values are refused",
    "plugins": "Liger and Cut Cross Entropy plugins: tunedag's own kernels (noted); LLMCompressorPlugin with "
               "llmcompressor; others are refused",
    "llmcompressor": "a recipe of ConstantPruningModifier alone: keep_sparsity with its 're:' targets (a pruned "
                     "model stays sparse); save_compressed is noted (tunedag saves dense safetensors); other "
                     "modifiers are refused",
}

IGNORED: dict[str, tuple[str, ...]] = {
    "tunedag computes in bf16 on CUDA GPUs (fp32 master LoRA weights) and fp32 on CPU; TF32 is the "
    "engine's choice":
        ("tf32", "float32", "fp32_norms", "fp32_norm_classes", "embeddings_skip_upcast"),
    "tunedag's engines choose attention themselves (packed variable-length attention on the triton engine, "
    "SDPA on torch)":
        ("attn_implementation", "flash_attention", "sdp_attention", "xformers_attention", "flex_attention",
         "flex_attn_compile_kwargs", "eager_attention", "sage_attention", "sdpa_varlen", "flash_attn_cross_entropy",
         "flash_attn_rms_norm", "flash_attn_fuse_mlp", "flash_optimum", "fused_attn_kernel", "large_head_attention",
         "flash_attn_d512", "gemma4_hybrid_attn_impl", "s2_attention"),
    "tunedag's triton engine has its own fused kernels (RMSNorm, RoPE, SwiGLU/GeGLU, LoRA projections, chunked "
    "cross entropy)":
        ("liger_rope", "liger_rms_norm", "liger_layer_norm", "liger_glu_activation", "liger_swiglu",
         "liger_cross_entropy", "liger_fused_linear_cross_entropy", "liger_use_token_scaling", "cut_cross_entropy",
         "lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel", "chunked_cross_entropy",
         "chunked_cross_entropy_num_chunks", "use_kernels", "tiled_mlp", "tiled_mlp_num_shards",
         "tiled_mlp_use_original_mlp", "dpo_use_liger_kernel"),
    "tunedag reads the model and tokenizer classes from the base model's config.json":
        ("model_type", "type_of_model", "tokenizer_type", "tokenizer_use_fast", "tokenizer_legacy",
         "tokenizer_use_mistral_common", "tokenizer_save_jinja_files", "is_falcon_derived_model",
         "is_llama_derived_model", "is_mistral_derived_model", "is_qwen_derived_model", "trainer_cls"),
    "tunedag tokenizes in its tokenize stage into data/packed/<run> (rerun with snakemake -R tokenize)":
        ("dataset_prepared_path", "dataset_processes", "dataset_num_proc", "dataset_keep_in_memory",
         "skip_prepare_dataset", "is_preprocess", "preprocess_iterable", "remove_unused_columns",
         "num_dataset_shards_to_save", "dataset_shard_num", "dataset_shard_idx", "dataloader_pin_memory",
         "dataloader_num_workers", "dataloader_prefetch_factor", "dataloader_drop_last", "push_dataset_to_hub"),
    "tunedag packs rows itself (multipack into sequence_len, attention kept within each sample)":
        ("eval_sample_packing", "pad_to_sequence_len", "pad_to_multiple_of", "sample_packing_group_size",
         "sample_packing_bin_size", "sample_packing_mp_start_method",
         "sample_packing_eff_est", "multipack_real_batches", "batch_flattening", "group_by_length",
         "total_num_tokens", "total_supervised_tokens", "pretrain_multipack_attn"),
    "tunedag logs loss, learning rate, tokens/s and GPU memory to train_metrics.jsonl and W&B (wandb_*)":
        ("wandb_watch", "wandb_log_model", "wandb_run_id", "include_tokens_per_second", "include_tkps",
         "use_tensorboard", "use_mlflow", "mlflow_tracking_uri", "mlflow_experiment_name", "mlflow_run_name",
         "hf_mlflow_log_artifacts", "use_comet", "comet_api_key", "comet_workspace", "comet_project_name",
         "comet_experiment_key", "comet_mode", "comet_online", "comet_experiment_config", "use_trackio",
         "trackio_project_name", "trackio_run_name", "trackio_space_id", "use_otel_metrics", "otel_metrics_host",
         "otel_metrics_port", "profiler_steps", "profiler_steps_start"),
    "tunedag resumes a killed or requeued train job from the run's latest matching checkpoint by itself":
        ("auto_resume_from_checkpoints",),
    "tunedag's checkpoints are its own (weights and optimizer state, for resume) and the train stage's output is "
    "the final adapter or model":
        ("save_strategy", "save_safetensors", "save_only_model", "save_first_step", "load_best_model_at_end",
         "metric_for_best_model", "greater_is_better", "fsdp_final_state_dict_type"),
    "tunedag places processes and devices itself (Slurm tasks, one GPU per rank)":
        ("ddp", "ddp_timeout", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_find_unused_parameters",
         "world_size", "local_rank", "device_map", "max_memory", "gpu_memory_limit", "low_cpu_mem_usage",
         "accelerator_config", "experimental_skip_move_to_device", "use_ray", "ray_run_name", "ray_num_workers",
         "resources_per_worker", "qlora_sharded_model_loading", "lora_on_cpu", "gc_steps",
         "torch_empty_cache_steps", "gc_collect_steps"),
    "tunedag does not compile the model: its speed comes from hand-written kernels":
        ("torch_compile", "torch_compile_backend", "torch_compile_mode", "torch_compile_options"),
    "tunedag's gradient checkpointing is its own (non-reentrant, per decoder layer)":
        ("gradient_checkpointing_kwargs",),
    "a check of Axolotl's own, not needed here":
        ("strict", "debug", "axolotl_config_path", "loss_watchdog_threshold", "loss_watchdog_patience"),
    "tunedag grows the embeddings to the tokenizer's size exactly when special_tokens or tokens add tokens (new "
    "rows start at the mean of the others) and never shrinks them":
        ("resize_token_embeddings_to_32x", "mean_resizing_embeddings", "shrink_embeddings"),
    "tunedag's evaluate stage generates from the held-out prompts and scores them (eval_max_samples, "
    "eval_max_new_tokens, lm_eval_tasks)":
        ("eval_table_size", "eval_causal_lm_metrics", "do_causal_lm_eval", "generate_samples",
         "num_generation_samples", "generation_max_new_tokens", "generation_temperature", "generation_top_p",
         "generation_top_k", "generation_prompt_ratio", "generation_do_sample", "dpo_generate_during_eval",
         "gradio_title", "gradio_share", "gradio_server_name", "gradio_server_port", "gradio_max_new_tokens",
         "gradio_temperature"),
    "the merge stage always merges the adapter into the base model; the exports read the merged folder":
        ("merge_lora", "merge_method", "lora_model_dir_merge"),
    "tunedag does not push to the hub: runs/<run>/export/vllm is ready for `huggingface-cli upload`":
        ("hub_model_id", "hub_strategy", "hub_revision"),
    "the hub token comes from the environment (HF_TOKEN), never from a config":
        ("hf_use_auth_token",),
    "end-of-turn tokens come from the chat template; train_on_eos chooses which are trained":
        ("eot_tokens",),
}

REFUSED: dict[str, tuple[str, ...]] = {
    "tunedag trains in bf16 (GPUs from Ampere on), fp32, or with fp8: true in float8; fp16 training is not offered":
        ("fp16", "float16"),
    "tunedag's quantized base is 4-bit NF4 (adapter: qlora) and it trains quantization-aware with qat; GPTQ "
    "and other quantizers are not offered":
        ("quantization", "gptq",
         "use_onebitllms", "bnb_config_kwargs", "quantize_moe_experts", "nvfp4_merge_aware"),
    "tunedag trains plain LoRA (lora_r, lora_alpha, lora_dropout, lora_target_modules, lora_modules_to_save); "
    "this variant is not offered":
        ("peft_use_dora", "peft_use_rslora", "loraplus_lr_ratio", "loraplus_lr_embedding", "lora_rank_pattern",
         "lora_alpha_pattern", "peft_layers_to_transform", "peft_layers_pattern", "peft_layer_replication",
         "peft_init_lora_weights", "peft_trainable_token_indices", "peft_ensure_weight_tying",
         "peft_autocast_adapter_dtype", "lora_target_parameters", "lora_fan_in_fan_out", "peft", "relora",
         "relora_prune_ratio", "relora_prune_method", "relora_cpu_offload", "lisa_n_layers", "lisa_step_interval",
         "lisa_layers_attribute", "jagged_restart_steps", "jagged_restart_warmup_steps",
         "jagged_restart_anneal_steps"),
    "tunedag starts every run from base_model; to continue from an adapter, merge it into a model folder and "
    "use that as base_model":
        ("lora_model_dir",),
    "tunedag resumes from the run's own latest checkpoint by itself; a checkpoint from elsewhere cannot be "
    "resumed (remove the key, or start from a merged model as base_model)":
        ("resume_from_checkpoint",),
    "tunedag's optimizer settings are optimizer, learning_rate, weight_decay, adam_beta1, adam_beta2, "
    "adam_epsilon, max_grad_norm, lr_scheduler and the warmup; this one is not offered":
        ("optim_args", "optim_target_modules", "lr_groups", "embedding_lr", "embedding_lr_scale", "dion_lr",
         "dion_momentum", "dion_rank_fraction", "dion_rank_multiple_of", "qgalore_rank", "qgalore_update_proj_gap",
         "qgalore_scale", "qgalore_proj_type", "qgalore_proj_quant", "qgalore_proj_bits", "qgalore_proj_group_size",
         "qgalore_cos_threshold", "qgalore_gamma_proj", "qgalore_queue_size", "adam_beta3", "adam_epsilon2",
         "lr_scheduler_kwargs", "lr_quadratic_warmup",
         "lr_div_factor", "torchdistx_path",
         "neftune_noise_alpha", "batch_size", "auto_find_batch_size"),
    "tunedag's download stage writes each dataset to data/raw/<name> (a hub split streamed only as far as "
    "max_rows or max_words, which pretraining_dataset sets) and its tokenize stage packs rows of "
    "sequence_len; this data option is not offered":
        ("streaming", "streaming_multipack_buffer_size", "pretrain_multipack_buffer_size",
         "pretraining_sample_concatenation", "shuffle_merged_datasets",
         "shuffle_before_merging_datasets", "min_sample_len", "max_prompt_len",
         "eval_sequence_len", "sample_packing_seq_len_multiplier", "max_packed_sequence_len"),
    "tunedag holds out val_set_size of the training rows; separate evaluation datasets are not offered":
        ("test_datasets", "do_bench_eval", "bench_dataset", "bench_split"),
    "tunedag's objectives are supervised fine-tuning and rl: dpo (with dpo_loss_type ipo), orpo, kto, "
    "reward and prm; this setting is not offered":
        ("trl", "vllm", "ebft", "simpo_gamma", "cpo_alpha", "dpo_use_weighting",
         "dpo_padding_free", "dpo_loss_weights", "rpo_alpha", "dpo_norm_loss",
         "dpo_use_logits_to_keep", "use_eaft", "eaft_alpha", "eaft_k", "diffusion"),
    "tunedag spreads a run over GPUs by data parallelism (train_engine: ddp, fsdp or deepspeed) and trains "
    "long sequences on one GPU with gradient_checkpointing and activation_offloading":
        ("sequence_parallel_degree", "context_parallel_size", "tensor_parallel_size", "dp_shard_size",
         "dp_replicate_size", "heads_k_stride", "ring_attn_func", "deepcompile", "use_pose",
         "pose_split_on_token_ids", "pose_max_context_len", "pose_num_chunks", "selective_checkpointing",
         "layer_offloading", "dynamic_checkpoint", "expert_parallel_size"),
    "tunedag trains text decoders; images and other modalities are not offered":
        ("image_size", "image_resize_algorithm", "role_boundaries", "processor_type", "processor_kwargs",
         "freeze_mm_modules"),
    "tunedag adds tokens (special_tokens, tokens); renaming the tokenizer's reserved tokens and resetting "
    "untrained embedding rows are not offered":
        ("added_tokens_overrides", "fix_untrained_tokens"),
    "tunedag loads the base model as its config.json describes it; edit a copy of the model folder instead":
        ("base_model_config", "cls_model_config", "tokenizer_config", "overrides_of_model_config",
         "overrides_of_model_kwargs", "rope_scaling", "noisy_embedding_alpha",
         "experts_implementation", "llama4_linearized_experts", "scaling_softmax", "scaling_softmax_factor",
         "scaling_softmax_bias", "device", "use_sonicmoe"),
    "tunedag's chat templates are chosen by chat_template; extra template arguments and a default system "
    "message are not offered":
        ("chat_template_kwargs", "default_system_message"),
}


def _index(groups: dict[str, tuple[str, ...]]) -> dict[str, str]:
    table: dict[str, str] = {}
    for text, keys in groups.items():
        for key in keys:
            assert key not in table, key
            table[key] = text
    return table


IGNORED_KEYS = _index(IGNORED)
REFUSED_KEYS = _index(REFUSED)


# Keys of Axolotl's dataset entries that tunedag's dataset entries do not hold under the same name.
DATASET_TRANSLATED: dict[str, str] = {
    "split": "the hub dataset's split (path hf:org/name@split); a local file is read whole",
    "name": "the hub dataset's subset (path hf:org/name:subset); tunedag's own name: names data/raw/<name>",
    "ds_type": "no effect: tunedag reads the format from the file's suffix (.jsonl, .json, .csv, .parquet)",
    "train_on_eot": "train_on_eos (tunedag's end-of-turn tokens are the template's end-of-turn tokens)",
    "chat_template_jinja": "a path to a .jinja file is read in; the text itself is kept",
    "field_thinking": "message_property_mappings: the template's thinking key reads this message field",
    "template_thinking_key": "message_property_mappings: the key the chat template reads the thinking from "
                             "(reasoning_content unless set)",
}

DATASET_REFUSED: dict[str, tuple[str, ...]] = {
    "tunedag reads the whole file named by path (hf:org/name for a hub dataset); name the one file there":
        ("data_files", "shards", "shards_idx", "preprocess_shards", "skip"),
    "tunedag runs no dataset code: it reads data files":
        ("trust_remote_code", "input_transform"),
    "tunedag keeps every message and trains the turns of roles_to_train; edit the rows for more":
        ("message_field_training", "message_field_training_detail", "split_thinking",
         "field_human", "field_model"),
    "tunedag's dataset types are listed in README, \"Dataset formats\"; this form is not offered":
        ("conversation", "input_format", "format", "no_input_format", "system_format", "system_prompt",
         "prompt_format", "chosen_format", "rejected_format", "completion_format", "logprobs_field", "temperature",
         "text_column", "length",
         "max_input_id", "min_input_id", "sequence_length"),
}

DATASET_REFUSED_KEYS = _index(DATASET_REFUSED)
