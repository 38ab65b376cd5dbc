"""The Gluon kernel (grouped_gemm_gluon.py) compiled for Hopper on any machine, no GPU needed, and what
its compiled code says: the waits on the tensor cores in the PTX, and ptxas's report (registers, spills,
whether it serialised the wgmma). The CPU tests read it; it is not on any path that runs a GEMM."""

import re
import subprocess
import tempfile
from dataclasses import dataclass

from moeplace.kernels._triton import gl, triton
from moeplace.kernels.fp8_quant import EPS, FP8_MAX, GROUP
from moeplace.kernels.gemm_table import GemmConfig
from moeplace.kernels.grouped_gemm_gluon import CONSUMER_REGS, LOADER_REGS, _gluon_kernel, halves


@dataclass(frozen=True, slots=True)
class CompiledGluon:
    """The kernel compiled for Hopper (sm_90a) on any machine, no GPU needed: its PTX and ptxas's report."""

    ptx: str
    shared_bytes: int
    registers: int
    spill_bytes: int
    serialised: bool  # ptxas's C7514: it made every wgmma of the kernel wait for the one before
    threads: int  # a program's threads (the PTX's .reqntid): every partition's warps

    def waits(self, outstanding: int) -> int:
        """How many `wgmma.wait_group` in the PTX leave `outstanding` wgmma groups running."""
        return self.ptx.count(f"wgmma.wait_group.sync.aligned {outstanding};")


def compile_for_hopper(cfg: GemmConfig, swiglu: bool, K: int = 7168, experts: int = 32,
                       programs: int = 132) -> CompiledGluon:
    """Compile the kernel for sm_90a as `launch_gluon` would run cfg. Needs the compiler, not the
    interpreter: TRITON_INTERPRET must be unset when this module is imported, or the Triton helpers the
    kernel calls are interpreted functions."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.experimental.gluon._runtime import GluonASTSource

    def desc(rows: int) -> str:
        layout = gl.NVMMASharedLayout.get_default_for([rows, GROUP], gl.float8e4nv)
        return f"tensordesc<fp8e4nv[{rows}, {GROUP}],{layout!r}>"

    ints = ("N", "K", "N_W", "stride_asm", "stride_bse", "stride_bsn", "stride_cm", "stride_csm", "E")
    signature = dict(a_desc=desc(cfg.block_m), as_ptr="*fp32", b_desc=desc(cfg.block_n), bs_ptr="*fp32",
                     c_ptr="*fp8e4nv" if swiglu else "*bf16", cs_ptr="*fp32", off_ptr="*i32", **dict.fromkeys(ints, "i32"))
    constants = dict(E_P2=triton.next_power_of_2(experts), GROUP_M=cfg.group_m,
                     NUM_PROGS=programs // cfg.programs_per_sm, CONSUMERS=cfg.programs_per_sm, HALVES=halves(cfg),
                     STAGES=cfg.num_stages,
                     SWIGLU=swiglu, CONSUMER_REGS=CONSUMER_REGS, LOADER_REGS=LOADER_REGS, FP8_MAX=FP8_MAX, EPS=EPS)
    signature.update(dict.fromkeys(constants, "constexpr"))
    kernel = triton.compile(GluonASTSource(_gluon_kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=cfg.num_warps // halves(cfg)))
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/k.ptx"
        with open(src, "w") as f:
            f.write(ptx)
        report = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", src, "-o", f"{tmp}/k.cubin"],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    threads = int(re.search(r"\.reqntid (\d+)", ptx).group(1))
    return CompiledGluon(ptx, kernel.metadata.shared, registers, spills, "C7514" in report, threads)
