"""Example kernels. Each module is what a kernel author writes: KERNEL_NAME, DEFAULT_TOPIC and a
process_message, plus what it needs. `uv run python -m examples.<name>` runs one inside the real
kernel (main.py, unchanged); README.md, "Example kernels", says how to adopt one."""

import logging
from collections.abc import Callable

import main


def run(process_message: Callable, kernel_name: str, default_topic: str) -> int:
    """main.main() with the example's handler and names in place of main.py's own."""
    main.process_message = process_message
    main.KERNEL_NAME, main.DEFAULT_TOPIC = kernel_name, default_topic
    main.log = logging.getLogger(kernel_name)
    main.PLAIN_FORMAT = main.PLAIN_FORMAT.replace("[example-kernel]", f"[{kernel_name}]")
    return main.main()
