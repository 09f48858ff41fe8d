"""Development tooling run from a checkout (not installed with the package): the ahead-of-time compile
check of the Triton kernels (`compile_check`, used by tests/test_compile.py) and its report
(`python -m tools.compile_report`)."""
