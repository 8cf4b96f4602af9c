//! Intel AMX (Advanced Matrix Extensions): the permission to use it, and the bfloat16
//! block kernel.

use std::sync::OnceLock;

use ragtune_util::cpu::SimdLevel;

/// Whether the AMX kernel runs: `RAGTUNE_SIMD` not below `avx512`, the CPU has AMX-TILE
/// and AMX-BF16 (CPUID leaf 7: EDX bits 24 and 22), and Linux granted this process the
/// tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, the
/// kernel's Documentation/arch/x86/xstate.rst). Asked once.
pub fn available() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| SimdLevel::active() >= SimdLevel::Avx512 && request())
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request() -> bool {
    use std::arch::x86_64::__cpuid_count;
    let edx = __cpuid_count(7, 0).edx;
    if edx & (1 << 24) == 0 || edx & (1 << 22) == 0 {
        return false;
    }
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: arch_prctl only changes this process's permitted xsave features; the
    // syscall instruction clobbers rcx and r11, declared below.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request() -> bool {
    false
}

/// The tile configuration (`LDTILECFG`'s 64-byte operand, palette 1): tiles 0-7 all 16
/// rows of 64 bytes.
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    /// Bytes per row of each tile.
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// `c (m_pad, 32) = a (m_pad, k_pad) · panel (k_pad, 32)` for one [`TilePanels`]
/// panel, in 32 x 32 blocks: accumulators tmm0-3, rows of `a` in tmm4-5, the panel's two
/// tiles in tmm6-7. Configures the tiles on this thread and releases them after.
///
/// # Safety
/// [`available`]; `m_pad` and `k_pad` multiples of 32; `a` valid for `m_pad * k_pad`
/// reads, `panel` for `k_pad * 32`, `c` for writes of 32 values at each of `m_pad` rows
/// `ldc` apart.
///
/// [`TilePanels`]: super::TilePanels
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn panel(
    a: *const u16,
    m_pad: usize,
    k_pad: usize,
    panel: *const u16,
    c: *mut f32,
    ldc: usize,
) {
    use std::arch::asm;
    let config = Config {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };
    let (a_stride, c_stride) = (k_pad * 2, ldc * 4);
    // SAFETY: every address below is inside the buffers of the caller's contract: the
    // blocks of `a` at rows i0..i0 + 32 and columns kb..kb + 32 (64 bytes a row), the
    // panel's 1 KiB tile pairs, and the 32 x 32 f32 block of `c` at row i0. The tile
    // registers are not used by compiled code, so the asm blocks clobber nothing else.
    unsafe {
        asm!("ldtilecfg [{0}]", in(reg) &config as *const Config, options(nostack));
        for i0 in (0..m_pad).step_by(32) {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack)
            );
            for kb in (0..k_pad).step_by(32) {
                let a0 = a.add(i0 * k_pad + kb);
                let b0 = panel.add(kb * 32);
                asm!(
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0,
                    a1 = in(reg) a0.add(16 * k_pad),
                    b0 = in(reg) b0,
                    b1 = in(reg) b0.add(512),
                    sa = in(reg) a_stride,
                    sb = in(reg) 64usize,
                    options(nostack)
                );
            }
            let c0 = c.add(i0 * ldc);
            asm!(
                "tilestored [{c0} + {sc}*1], tmm0",
                "tilestored [{c1} + {sc}*1], tmm1",
                "tilestored [{c2} + {sc}*1], tmm2",
                "tilestored [{c3} + {sc}*1], tmm3",
                c0 = in(reg) c0,
                c1 = in(reg) c0.add(16),
                c2 = in(reg) c0.add(16 * ldc),
                c3 = in(reg) c0.add(16 * ldc + 16),
                sc = in(reg) c_stride,
                options(nostack)
            );
        }
        asm!("tilerelease", options(nostack));
    }
}

/// Never called: [`available`] is false off x86-64.
#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn panel(
    _: *const u16,
    _: usize,
    _: usize,
    _: *const u16,
    _: *mut f32,
    _: usize,
) {
    unreachable!("AMX off x86-64")
}
