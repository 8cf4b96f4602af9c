//! [`SyncPtr`]: the one way parallel tasks (rayon jobs) share an `f32` output buffer to write
//! disjoint parts of it.

use std::marker::PhantomData;

/// A pointer to an `f32` buffer, borrowed mutably for `'a`, that may cross into parallel tasks
/// (it is [`Send`], [`Sync`] and [`Copy`]) so that each task writes its own part of the buffer.
///
/// Making the wrapper is safe; every write through it is `unsafe`, and the caller of
/// [`slice_mut`](Self::slice_mut) or of a write through [`get`](Self::get) must guarantee that
/// no two tasks touch the same element while the tasks run (disjoint parts), and that nothing
/// else reads or writes the buffer meanwhile. The borrow ties the pointer to the buffer: the
/// buffer cannot be moved or freed while the wrapper lives.
#[derive(Clone, Copy)]
pub struct SyncPtr<'a> {
    ptr: *mut f32,
    len: usize,
    _buffer: PhantomData<&'a mut [f32]>,
}

// SAFETY: the wrapper is a `&'a mut [f32]` split by the caller, not shared data: it only hands
// the buffer's address to other threads. `f32` is `Send`, so writing elements from another
// thread is sound, and the only accesses are through `unsafe` calls whose callers guarantee
// that concurrent tasks touch disjoint elements (see the type's documentation); with that, no
// data race can occur, which is what `Send` and `Sync` require.
unsafe impl Send for SyncPtr<'_> {}
// SAFETY: as for `Send`: sharing `&SyncPtr` only shares the address; all accesses are the
// disjoint writes the callers guarantee.
unsafe impl Sync for SyncPtr<'_> {}

impl<'a> SyncPtr<'a> {
    /// Wraps `buffer` for disjoint writes from parallel tasks.
    pub fn new(buffer: &'a mut [f32]) -> Self {
        SyncPtr {
            ptr: buffer.as_mut_ptr(),
            len: buffer.len(),
            _buffer: PhantomData,
        }
    }

    /// The buffer's first element, for callers that write through strides (e.g. a GEMM
    /// output). Writing through it is subject to the rules in the type's documentation and
    /// must stay within the buffer.
    pub fn get(self) -> *mut f32 {
        self.ptr
    }

    /// The elements `offset..offset + len` of the buffer, for this task alone.
    ///
    /// # Safety
    /// While the returned slice lives, no other task (and no other call of this function)
    /// may read or write any of its elements.
    ///
    /// # Panics
    /// When `offset + len` exceeds the buffer.
    pub unsafe fn slice_mut(self, offset: usize, len: usize) -> &'a mut [f32] {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "SyncPtr::slice_mut({offset}, {len}) out of a buffer of {}",
            self.len
        );
        // SAFETY: in bounds (asserted) of a buffer borrowed mutably for 'a; exclusive access
        // to these elements is the caller's guarantee.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset), len) }
    }
}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    use super::*;

    #[test]
    fn rayon_tasks_write_disjoint_rows() {
        let (rows, cols) = (97, 13);
        let mut buf = vec![0f32; rows * cols];
        let p = SyncPtr::new(&mut buf);
        (0..rows).into_par_iter().for_each(|r| {
            // SAFETY: task r alone writes row r.
            let row = unsafe { p.slice_mut(r * cols, cols) };
            for (c, x) in row.iter_mut().enumerate() {
                *x = (r * cols + c) as f32;
            }
        });
        let want: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        assert_eq!(buf, want);
    }

    #[test]
    fn strided_writes_through_the_raw_pointer() {
        let (rows, cols) = (8, 5);
        let mut buf = vec![0f32; rows * cols];
        let p = SyncPtr::new(&mut buf);
        (0..cols).into_par_iter().for_each(|c| {
            for r in 0..rows {
                // SAFETY: task c alone writes column c; r * cols + c < rows * cols.
                unsafe { *p.get().add(r * cols + c) = c as f32 };
            }
        });
        assert!(buf.chunks(cols).all(|row| row == [0.0, 1.0, 2.0, 3.0, 4.0]));
    }

    #[test]
    #[should_panic(expected = "out of a buffer")]
    fn an_out_of_bounds_slice_panics() {
        let mut buf = vec![0f32; 4];
        let p = SyncPtr::new(&mut buf);
        // SAFETY: nothing else uses the buffer (and the call panics before any access).
        let _ = unsafe { p.slice_mut(2, 3) };
    }
}
