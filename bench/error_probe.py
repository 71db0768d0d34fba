"""Does a bad input to specops' C++ CPU kernels raise, or crash the process?

On the first GPU machine run (H200, torch 2.11.0+cu130, GCC 13.3 build at -O1, 2026-11-27)
three test workers died with a segmentation fault, each inside a C++ op that was about to
raise ValueError for a bad input (tests/test_cpu_kernels.py test_wrong_shape_is_value_error,
tests/test_bad_input.py test_bad_values_raise_at_cheap_level, tests/test_kv_commit.py
test_wrong_dtype_shape_device_names_the_argument). Here (torch 2.13.0+cpu, GCC 12, LTO) the
same tests raise as they should. This probe runs each kind of error in a child process of
its own, so one crash does not hide the others, and prints one line per case:
``raised ValueError`` (expected), ``no error`` or ``crashed: signal N``. With ``--gdb GDB``
a crashing case is run again under that debugger (cuda-gdb on the GPU machine: it has no
gdb) and its native backtrace printed. It also prints which libstdc++, libgcc_s and libgomp
the process has loaded, the usual suspects when exceptions crash across shared libraries, and
whether _C carries a C++ runtime of its own (a statically linked libstdc++: with GCC 12 it cuts
the ValueError messages at their first number, which is the lead for that crash).

    python bench/error_probe.py                  # every case; exit status 1 if one crashed
    python bench/error_probe.py --gdb cuda-gdb   # and a backtrace of each crash
"""

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> the call, in a child process: the raw op (torch.ops.specops, the C++ CPU kernel),
# so the C++ code raises, not specops' Python wrappers, which check first
CASES = {
    "TypeError (wrong dtype)": "OPS.chain_verify_greedy(logits.double(), tokens, lens)",
    "ValueError (wrong shape)": "OPS.chain_verify_greedy(logits[0], tokens, lens)",
    "ValueError (bad value)":
        "specops._C.set_check_level(1); OPS.chain_verify_greedy(logits, tokens, lens + 9)",
    "ValueError (kv_commit)": "OPS.kv_commit([kv], lens, path[:, :0], lens * 0, None)",
}
SETUP = """
import torch, specops
OPS = torch.ops.specops
logits = torch.randn(2, 4, 16)
tokens = torch.randint(16, (2, 3))
lens = torch.tensor([3, 1], dtype=torch.int32)
kv = torch.randn(2, 2, 8, 4)
path = torch.tensor([[1, 2], [1, -1]], dtype=torch.int32)
OPS.chain_verify_greedy(logits, tokens, lens)  # good inputs first: the op itself runs
specops._C.set_check_level(0)  # as the crashed tests: only the C++ structural checks
"""
CALL = """
try:
    {call}
except (TypeError, ValueError) as error:
    print(f"raised {{type(error).__name__}}: {{str(error)[:100]}}")
else:
    print("no error")
"""
LIBS = """
import specops  # loads specops._C
names = ("libstdc++", "libgcc_s", "libgomp", "_C.")
seen = sorted({line.split()[-1] for line in open("/proc/self/maps")
               if any(n in line for n in names) and "/" in line})
print("loaded:", *seen, sep="\\n  ")
# A libstdc++ linked statically into _C is a second C++ runtime beside torch's shared one:
# numbers formatted into an error message then come out cut short (GCC 12), or may crash
# (cmake/check_cxx_runtime.cmake).
import ctypes
own = ctypes.cast(ctypes.CDLL(specops._C.__file__).__cxa_throw, ctypes.c_void_p).value
shared = ctypes.cast(ctypes.CDLL("libstdc++.so.6").__cxa_throw, ctypes.c_void_p).value
print("C++ runtime:", "one (the shared libstdc++.so.6)" if own == shared
      else "two: _C defines __cxa_throw itself (libstdc++ linked statically)")
"""


def run(source: str, gdb: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", source]
    if gdb:
        command = [gdb, "-batch", "-ex", "run", "-ex", "bt 30", "--args", *command]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gdb", help="debugger for a backtrace of each crash (gdb, cuda-gdb)")
    args = parser.parse_args(argv)
    crashed = 0
    for name, call in CASES.items():
        result = run(SETUP + CALL.format(call=call))
        if result.returncode < 0:
            crashed += 1
            print(f"{name}: crashed: signal {-result.returncode}", flush=True)
            if args.gdb:
                trace = run(SETUP + CALL.format(call=call), args.gdb)
                print("\n".join("    " + line for line in trace.stdout.splitlines()
                                if line.startswith("#") or "signal" in line.lower()),
                      flush=True)
        else:
            lines = (result.stdout.strip() or result.stderr.strip()).splitlines()
            print(f"{name}: {lines[-1] if lines else f'exit status {result.returncode}'}",
                  flush=True)   # a step cut by its time limit keeps what was printed
    print(run(LIBS).stdout.strip())
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
