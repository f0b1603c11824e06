"""Example kernels. Each module is what a kernel author writes: KERNEL_NAME, DEFAULT_TOPIC and a
process_message, plus what it needs, and hands them to main.run_kernel(). `uv run python -m examples.<name>`
runs one inside the real kernel (main.py, unchanged); README.md, "Example kernels", says how to adopt
one."""
