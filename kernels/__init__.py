"""Triton kernels with hand-written backward passes, imported as ``tunedag.kernels``.

The folder sits at the repository's top level (the design card's layout) and is reached from
the library through the symlink ``tunedag/kernels``: a top-level package named ``kernels``
would shadow Hugging Face's ``kernels`` package, which transformers probes for.
Each op lives in its own module: Triton kernels, a launcher, a ``torch.autograd.Function``
and a plain-PyTorch reference that tests and benchmarks compare against.
"""
