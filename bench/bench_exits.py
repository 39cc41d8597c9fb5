"""Exit throughput: a guest doing N port writes in a loop, on each engine.

    python bench/bench_exits.py [--exits N]

Prints exits/s for: the kvm engine (cffi binding, Python dispatch to the bus), a C-free Python
baseline driving the same vCPU with fcntl.ioctl and struct (no cffi, no bus), and the emu engine
(each OUT is a hook into Python). Asserts nothing.
"""

from __future__ import annotations

import argparse
import fcntl
import struct
import sys
import time

from replayvm.engines.base import StopReason

sys.path.insert(0, ".")
from tests.harness import TestMachine, flat_protected_state  # noqa: E402

CODE_ADDR = 0x1000
# 32-bit: mov $N, %ecx; 1: out %al, $0x80; loop 1b; hlt
def out_loop(count: int) -> bytes:
    return b"\xb9" + struct.pack("<I", count) + b"\xe6\x80\xe2\xfc\xf4"


def machine_with_loop(count: int) -> TestMachine:
    machine = TestMachine(ram_bytes=1 << 20)
    code = out_loop(count)
    machine.ram[CODE_ADDR:CODE_ADDR + len(code)] = code
    return machine


def bench_engine(name: str, count: int) -> float:
    machine = machine_with_loop(count)
    if name == "kvm":
        from replayvm.engines.kvm import KvmEngine as Engine
    else:
        from replayvm.engines.emu import EmuEngine as Engine
    engine = Engine(machine)
    engine.set_state(flat_protected_state(CODE_ADDR, 0x500, machine.ram))
    start = time.perf_counter()
    reason = engine.run(budget_ns=600_000_000_000)
    elapsed = time.perf_counter() - start
    engine.close()
    assert reason is StopReason.HALT and len(machine.ports.writes) == count, reason
    return count / elapsed


def bench_python_baseline(count: int) -> float:
    """The same guest driven by a plain Python loop: fcntl.ioctl + struct on the kvm_run page."""
    from replayvm.engines._kvm import ffi, lib     # only to create the VM and read constants
    from replayvm.engines.kvm import KvmEngine

    machine = machine_with_loop(count)
    engine = KvmEngine(machine)
    engine.set_state(flat_protected_state(CODE_ADDR, 0x500, machine.ram))
    run_map = engine._run_map
    reason_offset = ffi.offsetof("struct kvm_run", "exit_reason")
    io_offset = ffi.offsetof("struct kvm_run", "io")
    kvm_run, exit_io, exit_hlt = lib.KVM_RUN, lib.KVM_EXIT_IO, lib.KVM_EXIT_HLT
    seen = 0
    start = time.perf_counter()
    while True:
        fcntl.ioctl(engine.vcpu_fd, kvm_run, 0)
        reason = struct.unpack_from("<I", run_map, reason_offset)[0]
        if reason == exit_io:
            direction, size, port, n, data_offset = struct.unpack_from("<BBHIQ", run_map, io_offset)
            run_map[data_offset]             # read the data, as a real handler would
            seen += 1
        elif reason == exit_hlt:
            break
    elapsed = time.perf_counter() - start
    engine.close()
    assert seen == count
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exits", type=int, default=100_000)
    args = parser.parse_args()
    n = args.exits
    try:
        print(f"{'kvm engine (cffi, bus dispatch)':42s} {bench_engine('kvm', n):12,.0f} exits/s")
        print(f"{'kvm, C-free Python loop (fcntl+struct)':42s} {bench_python_baseline(n):12,.0f} exits/s")
    except Exception as error:            # no KVM here: say so, measure the rest
        print(f"kvm: not measured ({error})")
    print(f"{'emu engine (OUT hook into Python)':42s} {bench_engine('emu', n):12,.0f} exits/s")


if __name__ == "__main__":
    main()
