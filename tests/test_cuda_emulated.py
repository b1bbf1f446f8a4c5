"""The CUDA kernels of csrc/cuda/quant4_cuda.cu, run on the CPU: the unchanged source built with the host
compiler against the emulator in tests/cuda_emu/ (threads as fibers, real __syncthreads / warp shuffle / grid
barriers; see emu.h), called through ctypes on host memory.

What this covers without a GPU: every launcher's choice of path (tensor cores vs CUDA cores, 16-byte vs
element-wise, plain vs cooperative), every index computation, tail and grid-stride loop, the shuffle
reductions, the mma.sync fragment bookkeeping, the grid-wide sync of the single-launch LoRA path, and the
results — bit for bit against the PyTorch reference for the
dequantiser, within the float64-reference bound for the GEMV and the merge. Every buffer sits against an
inaccessible page, so a read or write past its end faults; outputs and scratch start poisoned (NaN).
What it cannot cover: the hardware (PTX loads, real occupancy, timing) — the `gpu` tests of test_native_cuda.py.
The emulated mma.sync gathers operands by the fragment layout of PTX's ISA (checked here against a plain
matrix product), so the kernels' use of that layout is tested, not the layout itself.
"""

from __future__ import annotations

import ctypes
import dataclasses
import faulthandler
import hashlib
import math
import mmap
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
from helpers import DTYPES, FLOOR, ROOT, id_formatter, rel_error

from fastlora import native
from fastlora.quant import dequantize_4bit, quantize_4bit

EMU = ROOT / "tests" / "cuda_emu"
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CUDA_SUCCESS, CUDA_ERROR_LAUNCH_FAILURE = 0, 719
SCHEDULES = ["round_robin", "lowest_first", "highest_first"]  # cuda_emu::Schedule

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="the CUDA emulator uses ucontext fibers, fork and mprotect (Linux)"
)

_SOURCES = [
    EMU / "emu.h", EMU / "emu.cpp", EMU / "kernels.cpp", EMU / "selftest.cpp", *sorted(EMU.glob("include/*.h")),
    ROOT / "csrc" / "quant4_format.h", *sorted((ROOT / "csrc" / "cuda").glob("*")),
]  # fmt: skip


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The emulated kernels as a shared library (built once per session, about 5 s)."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx}) to build the CUDA emulator")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES)).hexdigest()[:16]
    lib_path = tmp_path_factory.mktemp("cuda_emu") / f"emu-{digest}.so"
    cmd = [
        cxx, "-std=c++20", "-O2", "-fPIC", "-shared", "-ffp-contract=off", "-Wall", "-Wextra",
        "-Wno-unknown-pragmas", f"-I{EMU / 'include'}", f"-I{EMU}", f"-I{ROOT / 'csrc'}", "-x", "c++",
        str(EMU / "kernels.cpp"), str(EMU / "emu.cpp"), str(EMU / "selftest.cpp"), "-o", str(lib_path), "-lpthread",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"building the CUDA emulator failed:\n{proc.stderr[-4000:]}"
    lib = ctypes.CDLL(str(lib_path))
    lib.emu_last_error.restype = ctypes.c_char_p
    lib.emu_configure(2, 1, 0)
    yield lib
    lib.emu_configure(2, 1, 0)


@pytest.fixture
def device(emu):
    """Sets the emulated device: `device(sms, blocks_per_sm, schedule)` (the occupancy answer for every
    kernel; the order parked threads resume in, see SCHEDULES)."""
    yield lambda sms, per_sm, schedule="round_robin": emu.emu_configure(sms, per_sm, SCHEDULES.index(schedule))
    emu.emu_configure(2, 1, 0)


# -- guarded host buffers ----------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_PROT_NONE = 0
_CANARY = 0xA5
_mappings: dict[int, tuple[mmap.mmap, int, int]] = {}  # data_ptr -> (mapping, end of data, guard page)


def guarded(t: torch.Tensor | None, *, align: int = 32, shift: int = 0) -> torch.Tensor | None:
    """A contiguous copy of `t` in fresh pages, followed by an inaccessible (PROT_NONE) page.

    The copy starts `shift` bytes past an `align`-byte boundary (shift = 1 gives an unaligned view) and ends
    as close to the guard page as that allows (align = 1: exactly at it), so reading or writing past its
    end faults; the few bytes between its end and the guard hold a canary (:func:`assert_no_overrun`).
    """
    if t is None:
        return None
    t = t.contiguous()
    nbytes = t.numel() * t.element_size()
    page = mmap.PAGESIZE
    pages = max(1, -(-(nbytes + align + shift) // page))
    mapping = mmap.mmap(-1, (pages + 1) * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    assert _libc.mprotect(base + pages * page, page, _PROT_NONE) == 0, os.strerror(ctypes.get_errno())
    start = (pages * page - nbytes - shift) // align * align + shift
    mapping[start + nbytes : pages * page] = bytes([_CANARY]) * (pages * page - start - nbytes)
    out = torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=start).view(t.dtype).view(t.shape)
    out.copy_(t)
    _mappings[out.data_ptr()] = (mapping, start + nbytes, pages * page)  # also keeps the mapping alive
    return out


def poisoned(shape, dtype: torch.dtype, **kwargs) -> torch.Tensor:
    """A guarded output buffer full of NaN: what a kernel leaves unwritten stays NaN."""
    return guarded(torch.full(shape, float("nan"), dtype=dtype), **kwargs)


def assert_no_overrun(*tensors: torch.Tensor | None) -> None:
    """Nothing was written between the end of these guarded buffers and their guard pages."""
    for t in tensors:
        if t is not None:
            mapping, end, guard = _mappings[t.data_ptr()]
            assert mapping[end:guard] == bytes([_CANARY]) * (guard - end), f"write past the end of a {tuple(t.shape)}"


def _p(t: torch.Tensor | None) -> ctypes.c_void_p | None:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _state(state, **kwargs) -> list:
    """absmax, q, nested_absmax, nested_code, offset, code, blocksize of the launchers' AbsmaxRef."""
    nested = state.nested
    if nested is None:
        return [_p(guarded(state.absmax, **kwargs)), None, None, None, ctypes.c_float(0.0),
                _p(guarded(state.code)), ctypes.c_int(state.blocksize)]  # fmt: skip
    return [None, _p(guarded(state.absmax, **kwargs)), _p(guarded(nested.absmax)), _p(guarded(nested.code)),
            ctypes.c_float(nested.offset), _p(guarded(state.code)), ctypes.c_int(state.blocksize)]  # fmt: skip


@dataclasses.dataclass
class Launch:
    """What an emulated launcher returned (its cudaError_t and message) and the grid it launched."""

    rc: int
    error: str
    grid: int
    block: int
    cooperative: bool

    def check(self) -> Launch:
        assert self.rc == CUDA_SUCCESS, f"launch failed ({self.rc}): {self.error}"
        return self


def launch(emu, name: str, *args, timeout: float = 120.0) -> Launch:
    """Calls `emu.<name>(*args)` in a forked child, so that a fault (an access past a guarded buffer) or a
    hang fails this test instead of ending the run. The child makes no torch call; the buffers are shared
    mappings, so the parent sees what the kernel wrote."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one ctypes call, its report down the pipe, and out
        try:
            os.close(read_end)
            faulthandler.disable()  # an expected fault is reported by the parent, not dumped here
            rc = getattr(emu, name)(*args)
            record = (ctypes.c_int64 * 3)()
            emu.emu_last_launch(record)
            os.write(write_end, struct.pack("4q", rc, *record) + emu.emu_last_error())
        finally:
            os._exit(0)
    os.close(write_end)
    report, deadline = b"", time.monotonic() + timeout
    with os.fdopen(read_end, "rb") as pipe:
        while select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))[0]:
            chunk = os.read(pipe.fileno(), 1 << 16)
            if not chunk:
                break
            report += chunk
        else:
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        why = "a timeout" if sig == "SIGKILL" else "a read or write past the end of a guarded buffer"
        raise AssertionError(f"the emulated {name} died with {sig} ({why})")
    if len(report) < 32:  # the call itself raised in the child (ctypes refused an argument)
        raise AssertionError(f"the emulated {name} made no report: check its arguments")
    rc, grid, block, cooperative = struct.unpack("4q", report[:32])
    return Launch(rc, report[32:].decode(), grid, block, bool(cooperative))


# -- the emulator itself ---------------------------------------------------------------------------------


def test_emulator_shared_memory_is_per_block_and_shuffles_exchange_lanes(emu):
    blocks, threads = 5, 96
    out = guarded(torch.full((blocks * threads,), -1, dtype=torch.int32))
    launch(emu, "selftest_shared", _p(out), blocks, threads).check()
    assert torch.equal(out, torch.arange(blocks).repeat_interleave(threads).int())
    for lane_mask in (1, 5, 16, 31):
        got = poisoned((blocks * threads,), torch.float32)
        launch(emu, "selftest_shuffle", _p(got), blocks, threads, lane_mask).check()
        assert torch.equal(got, (torch.arange(blocks * threads) ^ lane_mask).float()), lane_mask


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=id_formatter("dtype"))
def test_emulator_mma_multiplies_by_the_ptx_fragment_layout(emu, dtype):
    """mma_16816 (quant4.cuh) with each lane's fragments gathered by its documented layout: D = C + A B."""
    a, b, c = torch.randn(16, 16).to(dtype), torch.randn(16, 8).to(dtype), torch.randn(16, 8)
    d = guarded(c)
    launch(emu, "selftest_mma", _p(guarded(a.view(torch.int16))), _p(guarded(b.view(torch.int16))), _p(d),
           int(dtype == torch.bfloat16)).check()  # fmt: skip
    ref = c.double() + a.double() @ b.double()
    assert torch.allclose(d.double(), ref, rtol=2**-23, atol=1e-6), (d.double() - ref).abs().max()


def test_emulator_grid_sync_orders_every_blocks_writes(emu, device):
    device(3, 2)
    blocks, threads = 6, 64
    n = blocks * threads
    flags, out = guarded(torch.zeros(n, dtype=torch.int32)), guarded(torch.zeros(n, dtype=torch.int32))
    launch(emu, "selftest_grid_sync", _p(flags), _p(out), blocks, threads).check()
    assert torch.equal(out, torch.full((n,), n * (n + 1) // 2, dtype=torch.int32))
    # more blocks than the device holds at once: refused, as cudaLaunchCooperativeKernel does
    assert launch(emu, "selftest_grid_sync", _p(flags), _p(out), 7, threads).rc == 720


def test_emulator_reports_a_shuffle_half_a_warp_never_reaches(emu):
    result = launch(emu, "selftest_divergent_shuffle", _p(guarded(torch.zeros(64))))
    assert result.rc == CUDA_ERROR_LAUNCH_FAILURE
    assert "deadlock" in result.error and "__shfl_xor_sync" in result.error and "16 of 32 arrived" in result.error


def test_emulator_turns_a_fault_into_a_test_failure(emu):
    """A kernel that writes past its buffer hits the guard page: the forked launch reports it."""
    out = guarded(torch.zeros(64), align=1)
    with pytest.raises(AssertionError, match="SIGSEGV"):
        launch(emu, "selftest_shuffle", _p(out), 1, 96, 1)  # 96 threads write 96 floats into 64


# -- dequantisation: bit-identical ------------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["aligned", "tight", "shifted"])
@pytest.mark.parametrize("double_quant", [False, True], ids=id_formatter("dq"))
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_bit_identical(emu, quant_type, double_quant, placement):
    """aligned: the 4-byte / 32-byte path with a tail; tight: the buffers end exactly at the guard page;
    shifted: packed one byte off alignment (the byte-wise path)."""
    kwargs = {"aligned": {}, "tight": {"align": 1}, "shifted": {"shift": 1}}[placement]
    tight = {"align": 4} if placement == "tight" else {}  # fp32 statistics: aligned to their element size
    for shape, bs in (((333, 97), 64), ((1001,), 128), ((7,), 32), ((40, 96), 4096), ((300, 256), 32)):
        w = torch.randn(shape)
        packed, state = quantize_4bit(w, quant_type, bs, double_quant, backend="torch")
        n = w.numel()
        for out_dtype in DTYPES:
            want = dequantize_4bit(packed, state, out_dtype, backend="torch").reshape(-1)
            out = poisoned((n,), out_dtype, **({"align": 2} if placement == "tight" else {}))
            launch(emu, "emu_dequantize_4bit", _p(guarded(packed, **kwargs)), *_state(state, **tight),
                   ctypes.c_int64(n), _p(out), DTYPE_CODE[out_dtype]).check()  # fmt: skip
            assert_no_overrun(out)
            assert torch.equal(out, want), (shape, bs, out_dtype)


# -- the decode GEMV ----------------------------------------------------------------------------------

# (K, N, quant_type, blocksize, double_quant): which path the launcher takes follows from K and alignment
GEMV_SHAPES = {
    "K256-N77": (256, 77, "nf4", 64, True),  # K % 32 == 0: the 16-byte streaming path
    "K1024-N45-bs4096": (1024, 45, "fp4", 4096, False),  # blocks span rows
    "K4160-N24": (4160, 24, "nf4", 64, True),  # 130 chunks a row: 4 to 5 per lane, the prefetch goes round
    # the tensor-core kernel's ring of 3 W steps: its warps stop at every slot of the ring (full steps
    # 43 and 52 over 8 warps: 5 to 7 a warp), with and without a partial last step
    "K5568-N20": (5568, 20, "nf4", 64, True),
    "K6656-N19": (6656, 19, "fp4", 128, False),
    "K200-N45": (200, 45, "nf4", 128, True),  # K % 8 == 0 but not 32: element-wise W, 16-byte x and A
    "K129-N33": (129, 33, "fp4", 32, False),  # odd K: rows start mid-byte
}


def _gemv(emu, x, packed, state, bias=None, lora_a=None, lora_b=None, lora_u=None, scale=1.0, ldx=None):
    """y and the launch of the emulated launcher, on guarded copies of the inputs; with `ldx` the rows of
    x are `ldx` elements apart."""
    m, k = x.shape
    n = state.shape[0]
    dtype = x.dtype
    xg = guarded(x if ldx is None else torch.nn.functional.pad(x, (0, ldx - k)))  # rows ldx apart
    r = lora_b.shape[1] if lora_b is not None else 0
    y = poisoned((m, n), dtype)
    coop = lora_a is not None and lora_b is not None
    su = poisoned((m, r), torch.float32) if coop else None
    y_partial = poisoned((m, n), torch.float32) if coop else None
    result = launch(
        emu, "emu_gemv_4bit", _p(xg), ctypes.c_int64(ldx or k), DTYPE_CODE[dtype], m, ctypes.c_int64(n),
        ctypes.c_int64(k), _p(guarded(packed)), *_state(state), _p(guarded(bias)), _p(guarded(lora_a)),
        _p(guarded(lora_b)), _p(guarded(lora_u)), r, ctypes.c_float(scale), _p(y), _p(su), _p(y_partial),
    ).check()  # fmt: skip
    assert_no_overrun(y, su, y_partial)
    return y, result


def _gemv_inputs(shape, m, dtype, lora, r=5):
    k, n, qt, bs, dq = GEMV_SHAPES[shape]
    packed, state = quantize_4bit(torch.randn(n, k) / math.sqrt(k), qt, bs, dq, backend="torch")
    x = torch.randn(m, k).to(dtype)
    bias = (torch.randn(n) * 0.1).to(dtype)
    a, b = (torch.randn(r, k) / math.sqrt(k)).to(dtype), (torch.randn(n, r) / math.sqrt(r)).to(dtype)
    kwargs = {}
    if lora == "a":
        kwargs = {"lora_a": a, "lora_b": b, "scale": 1.75}
    elif lora == "u":
        kwargs = {"lora_u": (x.float() @ a.float().T).to(dtype), "lora_b": b, "scale": 1.75}
    return x, packed, state, bias, kwargs


def _assert_close_to_float64(y, x, packed, state, bias, kwargs):
    ref = native.gemv_4bit_ref(x, packed, state, bias, compute_dtype=torch.float64, **kwargs).double()
    own = native.gemv_4bit_ref(x, packed, state, bias, compute_dtype=x.dtype, **kwargs)  # PyTorch's error
    assert not torch.isnan(y).any(), "an output was never written"
    assert rel_error(y, ref) <= 2 * rel_error(own, ref) + FLOOR[x.dtype], (rel_error(y, ref), rel_error(own, ref))


@pytest.mark.parametrize("lora", [None, "a", "u"], ids=id_formatter("lora"))
@pytest.mark.parametrize("dtype", DTYPES, ids=id_formatter("dtype"))
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 16], ids=id_formatter("M"))
@pytest.mark.parametrize("shape", list(GEMV_SHAPES))
def test_gemv_matches_float64_reference(emu, shape, m, dtype, lora):
    x, packed, state, bias, kwargs = _gemv_inputs(shape, m, dtype, lora)
    y, result = _gemv(emu, x, packed, state, bias, **kwargs)
    _assert_close_to_float64(y, x, packed, state, bias, kwargs)
    assert result.cooperative == (lora == "a") and result.block == (256 if _tensor_cores(x) else 128)
    if lora == "a":  # the emulated device (2 SMs x 1 block) makes the grid-stride loop go round
        assert result.grid == 2


def _tensor_cores(x: torch.Tensor) -> bool:
    """Whether the launcher takes the tensor-core kernel (256 threads a block) for this x."""
    return x.dtype != torch.float32 and x.shape[1] % 32 == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=id_formatter("dtype"))
def test_gemv_multi_adapter_epilogue(emu, dtype):
    """Many adapters (gemv_4bit_multi_native): each row gathers its slot's B_i and s_i in the epilogue of
    the tensor-core, CUDA-core and element-wise kernels; rows of -1 and a slot out of range get no term."""
    slots, r = 4, 6
    for shape, m in (("K256-N77", 16), ("K200-N45", 3), ("K129-N33", 9)):
        x, packed, state, bias, _ = _gemv_inputs(shape, m, dtype, None)
        n = state.shape[0]
        u, pool_b = torch.randn(m, r).to(dtype), (torch.randn(slots, n, r) / math.sqrt(r)).to(dtype)
        scales = torch.rand(slots) + 0.5
        idx = torch.arange(m, dtype=torch.int32) % (slots + 1) - 1
        idx[-1] = slots  # out of range (the eager wrapper raises; the kernel must not read past the pool)
        y = poisoned((m, n), dtype)
        launch(
            emu, "emu_gemv_4bit_multi", _p(guarded(x)), DTYPE_CODE[dtype], m, ctypes.c_int64(n),
            ctypes.c_int64(x.shape[1]), _p(guarded(packed)), *_state(state), _p(guarded(bias)),
            _p(guarded(pool_b)), _p(guarded(u)), r, _p(guarded(idx)), _p(guarded(scales)), slots, _p(y),
        ).check()  # fmt: skip
        assert_no_overrun(y)
        live = torch.where(idx < slots, idx, -1)
        ref = native.gemv_4bit_multi_ref(x, packed, state, bias, u, pool_b, scales, live, compute_dtype=torch.float64)
        own = native.gemv_4bit_multi_ref(x, packed, state, bias, u, pool_b, scales, live, compute_dtype=dtype)
        assert not torch.isnan(y).any(), "an output was never written"
        assert rel_error(y, ref.double()) <= 2 * rel_error(own, ref.double()) + FLOOR[dtype], shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=id_formatter("dtype"))
@pytest.mark.parametrize("m", [1, 7, 8, 9, 16], ids=id_formatter("M"))
@pytest.mark.parametrize("shape", ["K256-N77", "K1024-N45-bs4096", "K4160-N24", "K5568-N20", "K6656-N19"])
def test_gemv_tensor_cores_round_only_the_output(emu, shape, m, dtype):
    """The tensor-core kernel multiplies by exactly the dequantised weights in `dtype` (fp32 code x absmax,
    rounded once) and sums in fp32: against that product in float64 its only error is the final rounding
    of y (half an ulp) plus fp32 summation (far below it). A wrong absmax block, a nibble taken from the
    wrong byte or a k paired with the wrong x shows up here even where the float64-reference bound would
    hide it."""
    x, packed, state, bias, _ = _gemv_inputs(shape, m, dtype, None)
    y, result = _gemv(emu, x, packed, state, bias)
    assert result.block == 256
    w = dequantize_4bit(packed, state, dtype, backend="torch").double()
    exact = x.double() @ w.T + bias.double()
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((y.double() - exact).abs() <= 0.5 * ulp + 1e-6 * exact.abs().max()).all()


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=id_formatter("dtype"))
@pytest.mark.parametrize("per_sm", [1, 3, 64], ids=id_formatter("blocks_per_sm"))
def test_gemv_single_launch_lora_any_grid_size(emu, device, per_sm, dtype, schedule):
    """The cooperative path gives the same result whether one block does every task or each has its own,
    and whichever warp runs ahead (a block that loops over tasks reuses its shared memory)."""
    device(1, per_sm, schedule)
    x, packed, state, bias, kwargs = _gemv_inputs("K256-N77", 4, dtype, "a", r=17)
    y, result = _gemv(emu, x, packed, state, bias, **kwargs)
    _assert_close_to_float64(y, x, packed, state, bias, kwargs)
    # block tasks: CUDA cores, 4 rows of W or A each; tensor cores, 16 rows of W or 8 of A
    tasks = (77 + 17 + 3) // 4 if dtype == torch.float32 else (77 + 15) // 16 + (17 + 7) // 8
    assert result.cooperative and result.grid == min(per_sm, tasks)


@pytest.mark.parametrize("ldx_extra", [32, 3], ids=["aligned-rows", "unaligned-rows"])
def test_gemv_row_strided_x(emu, ldx_extra):
    """x rows `ldx` elements apart (a view of a wider buffer): aligned rows keep the 16-byte path."""
    x, packed, state, bias, kwargs = _gemv_inputs("K256-N77", 5, torch.bfloat16, "a")
    y, _ = _gemv(emu, x, packed, state, bias, **kwargs, ldx=x.shape[1] + ldx_extra)
    _assert_close_to_float64(y, x, packed, state, bias, kwargs)


def test_gemv_rejects_more_than_16_rows(emu):
    x, packed, state, _, _ = _gemv_inputs("K256-N77", 17, torch.float32, None)
    result = launch(
        emu, "emu_gemv_4bit", _p(guarded(x)), ctypes.c_int64(256), 0, 17, ctypes.c_int64(77), ctypes.c_int64(256),
        _p(guarded(packed)), *_state(state), None, None, None, None, 0, ctypes.c_float(1.0),
        _p(poisoned((17, 77), torch.float32)), None, None,
    )  # fmt: skip
    assert result.rc == 1  # cudaErrorInvalidValue; the binding raises its own message before this


# -- merge ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", DTYPES, ids=id_formatter("out"))
@pytest.mark.parametrize("dtype", DTYPES, ids=id_formatter("lora"))
def test_merge_matches_float64_reference(emu, dtype, out_dtype):
    n, k, r = 37, 203, 7
    packed, state = quantize_4bit(torch.randn(n, k) / k**0.5, "nf4", 64, True, backend="torch")
    a, b = torch.randn(r, k).to(dtype), torch.randn(n, r).to(dtype)
    out = poisoned((n, k), out_dtype)
    launch(emu, "emu_merge_4bit", _p(guarded(packed)), *_state(state), ctypes.c_int64(n), ctypes.c_int64(k), r,
           _p(guarded(a)), _p(guarded(b)), DTYPE_CODE[dtype], ctypes.c_float(0.5), _p(out),
           DTYPE_CODE[out_dtype]).check()  # fmt: skip
    assert_no_overrun(out)
    ref = native.merge_4bit_ref(packed, state, a, b, 0.5, torch.float64, compute_dtype=torch.float64)
    own = native.merge_4bit_ref(packed, state, a, b, 0.5, out_dtype, compute_dtype=out_dtype)
    assert not torch.isnan(out).any()
    assert rel_error(out, ref) <= 2 * rel_error(own, ref) + FLOOR[out_dtype]


@pytest.mark.parametrize("lora", ["a", "u"], ids=id_formatter("lora"))
@pytest.mark.parametrize("shape", ["K256-N77", "K129-N33"])  # tensor cores; CUDA cores (odd K)
def test_gemv_fp16_limits(emu, shape, lora):
    """issue 18, the native path: lora_alpha 2048, r 8 (s = 256) and |x| ≈ 300 in fp16, where ``(s·u) Bᵀ`` in
    fp16 overflows although every exact output is below ~1000. The kernel keeps s·u and the LoRA sum in fp32
    (``fmaf(scale, Σ u B, y)``): every output is finite and within fp16's bound of the float64 result."""
    k, n, qt, bs, dq = GEMV_SHAPES[shape]
    g = torch.Generator().manual_seed(18)
    w = (torch.rand(n, k, generator=g) * 2 - 1) / math.sqrt(k)
    packed, state = quantize_4bit(w, qt, bs, dq, backend="torch")
    sign = torch.where(torch.rand(8, k, generator=g) < 0.5, -1.0, 1.0)
    x = (sign * (150 + 300 * torch.rand(8, k, generator=g))).half()
    a = ((torch.rand(8, k, generator=g) * 2 - 1) / math.sqrt(k)).half()
    b = ((torch.rand(n, 8, generator=g) * 2 - 1) * 2e-3).half()
    u = (x.float() @ a.float().T).half()
    kwargs = {"lora_a": a} if lora == "a" else {"lora_u": u}
    kwargs.update(lora_b=b, scale=256.0)
    y, _ = _gemv(emu, x, packed, state, None, **kwargs)
    ref = native.gemv_4bit_ref(x, packed, state, None, compute_dtype=torch.float64, **kwargs)
    assert ref.double().abs().max() < 4000 and (u.float() * 256).abs().max() > 65504  # fp16 (s·u) overflows
    assert torch.isfinite(y).all()
    assert rel_error(y, ref) <= FLOOR[torch.float16]
