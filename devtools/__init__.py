"""Development tooling: the embedded broker and the local run. Not part of the kernel image."""
