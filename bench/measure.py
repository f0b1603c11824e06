"""What a probe reports about itself: wall time, CPU time, and its own peak memory.

Peak memory is VmHWM from /proc/self/status: the high-water mark of this process's own resident set.
Not ru_maxrss: on Linux a child started with fork and exec inherits its parent's high-water mark
through ru_maxrss (the kernel keeps the pre-exec one), so every probe started by the benchmark,
which had just produced the test data, reported the benchmark's own peak, about 87 MB.
"""

import resource
import time


def peak_rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def usage() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return {"time": time.time(), "cpu_s": own.ru_utime + own.ru_stime, "peak_rss_kb": peak_rss_kb(),
            "ru_maxrss_kb": own.ru_maxrss}
