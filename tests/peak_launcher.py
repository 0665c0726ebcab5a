"""Run a command and write its peak resident memory (kB) to a file: ``python peak_launcher.py OUT CMD...``.

Why a launcher: Linux carries a process's high-water RSS across ``exec`` (``signal->maxrss``), so a probe
spawned straight from a pytest worker that holds 2 GB reports a 2 GB peak however little the probe itself
used. Spawned from this small process instead, the probe's peak starts at this process's ~10 MB.
stdin, stdout, stderr and the working folder pass through; the exit status is the command's (128 + N
for a signal N, as a shell reports it).
"""
import os
import sys

out, *cmd = sys.argv[1:]
pid = os.posix_spawn(cmd[0], cmd, os.environ)
_, status, usage = os.wait4(pid, 0)
with open(out, "w") as f:
    f.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(128 - code if code < 0 else code)
