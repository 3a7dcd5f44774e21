//! A rank's symmetric heap on the CPU: `plan.heap.bytes` bytes at the plan's offsets,
//! holding values in the layer's dtype exactly as device memory would.
//!
//! The bytes live in 64-bit atomic words so that every rank thread may write into every
//! other rank's heap without `unsafe`: data words are stored and loaded with `Relaxed`
//! ordering, signal words with `Release` / `Acquire`, which orders the data written before
//! a signal before the reads of whoever sees that signal (the device's `st.release` /
//! `ld.acquire` pair). Elements are packed little-endian, element 0 in the low bits.

use super::bf16::{bits_row, values_row};
use crate::config::Dtype;
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};

/// One rank's symmetric heap.
pub struct SymHeap {
    rank: usize,
    dtype: Dtype,
    words: Vec<AtomicU64>,
}

impl std::fmt::Debug for SymHeap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SymHeap")
            .field("rank", &self.rank)
            .field("dtype", &self.dtype)
            .field("bytes", &self.bytes())
            .finish()
    }
}

fn encode(dtype: Dtype, v: f32) -> u64 {
    match dtype {
        Dtype::Bf16 => u64::from(half::bf16::from_f32(v).to_bits()),
        Dtype::F16 => u64::from(half::f16::from_f32(v).to_bits()),
        Dtype::F32 => u64::from(v.to_bits()),
    }
}

fn decode(dtype: Dtype, bits: u64) -> f32 {
    match dtype {
        Dtype::Bf16 => half::bf16::from_bits(bits as u16).to_f32(),
        Dtype::F16 => half::f16::from_bits(bits as u16).to_f32(),
        Dtype::F32 => f32::from_bits(bits as u32),
    }
}

/// Words per batch of [`SymHeap::write`] and [`SymHeap::read`]: values are converted in
/// a plain buffer (a loop that vectorises), then moved with one relaxed atomic access per
/// word.
const BATCH: usize = 64;

/// `values` encoded in the dtype into `words`, `8 / size` per word, first in the low bits.
fn encode_words(dtype: Dtype, values: &[f32], words: &mut [u64]) {
    match dtype {
        // Little-endian: the words' bytes are the values' bits in order.
        Dtype::Bf16 if cfg!(target_endian = "little") => {
            bits_row(values, bytemuck::cast_slice_mut::<u64, u16>(words));
        }
        Dtype::F32 if cfg!(target_endian = "little") => {
            let w32 = bytemuck::cast_slice_mut::<u64, u32>(words);
            w32.iter_mut()
                .zip(values)
                .for_each(|(w, v)| *w = v.to_bits());
        }
        _ => {
            let per = 8 / dtype.size();
            let bits = 64 / per;
            for (w, chunk) in words.iter_mut().zip(values.chunks(per)) {
                *w = chunk
                    .iter()
                    .enumerate()
                    .fold(0u64, |acc, (i, &v)| acc | (encode(dtype, v) << (i * bits)));
            }
        }
    }
}

/// `words` decoded from the dtype into `out`, `8 / size` values per word.
fn decode_words(dtype: Dtype, words: &[u64], out: &mut [f32]) {
    match dtype {
        Dtype::Bf16 if cfg!(target_endian = "little") => {
            values_row(bytemuck::cast_slice::<u64, u16>(words), out);
        }
        Dtype::F32 if cfg!(target_endian = "little") => {
            let w32 = bytemuck::cast_slice::<u64, u32>(words);
            out.iter_mut()
                .zip(w32)
                .for_each(|(o, &w)| *o = f32::from_bits(w));
        }
        _ => {
            let per = 8 / dtype.size();
            let bits = 64 / per;
            let mask = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            for (&w, chunk) in words.iter().zip(out.chunks_mut(per)) {
                for (i, o) in chunk.iter_mut().enumerate() {
                    *o = decode(dtype, (w >> (i * bits)) & mask);
                }
            }
        }
    }
}

/// `values` as little-endian u32 pairs in 64-bit words, an odd count padded with 0 (the
/// layout of the heap's u32 metadata).
pub fn u32_words(values: &[u32]) -> Vec<u64> {
    values
        .chunks(2)
        .map(|c| u64::from(c[0]) | (u64::from(c.get(1).copied().unwrap_or(0)) << 32))
        .collect()
}

impl SymHeap {
    /// A zeroed heap of `bytes` bytes (a multiple of 8) for `rank`, holding `dtype` values.
    pub fn new(rank: usize, bytes: u64, dtype: Dtype) -> Result<Self> {
        let too_large = || Error::PlanTooLarge {
            what: format!("CPU heap of rank {rank}: {bytes} bytes do not fit in memory"),
        };
        if !bytes.is_multiple_of(8) {
            return Err(Error::PlanTooLarge {
                what: format!("CPU heap of rank {rank}: {bytes} bytes is not a multiple of 8"),
            });
        }
        let n = usize::try_from(bytes / 8).map_err(|_| too_large())?;
        let mut words = Vec::new();
        words.try_reserve_exact(n).map_err(|_| too_large())?;
        words.extend((0..n).map(|_| AtomicU64::new(0)));
        Ok(SymHeap { rank, dtype, words })
    }

    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.words.len() as u64 * 8
    }

    /// A copy of the whole heap as little-endian bytes, as device memory would hold it
    /// (stage checks read captures in the plan's layout).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.words
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
            .collect()
    }

    /// The dtype of the values stored.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The words covering `n` elements at byte `offset`, which must be 8-aligned and span
    /// whole words.
    fn span(&self, offset: u64, n: usize) -> Result<&[AtomicU64]> {
        let es = self.dtype.size() as u64;
        let len = n as u64 * es;
        let bad = |why: &str| Error::Device {
            rank: self.rank,
            stage: "heap",
            what: format!("access of {len} bytes at offset {offset}: {why}"),
            expected: self.bytes(),
            observed: offset.saturating_add(len),
        };
        if !offset.is_multiple_of(8) || !len.is_multiple_of(8) {
            return Err(bad("not whole 8-byte words"));
        }
        let (a, b) = (
            (offset / 8) as usize,
            (offset.saturating_add(len) / 8) as usize,
        );
        self.words
            .get(a..b)
            .ok_or_else(|| bad("past the end of the heap"))
    }

    /// Stores `values` at byte `offset`, each rounded to the dtype (data ordering).
    pub fn write(&self, offset: u64, values: &[f32]) -> Result<()> {
        let span = self.span(offset, values.len())?;
        let per = 8 / self.dtype.size();
        let mut buf = [0u64; BATCH];
        for (ws, vs) in span.chunks(BATCH).zip(values.chunks(BATCH * per)) {
            let words = &mut buf[..ws.len()];
            encode_words(self.dtype, vs, words);
            for (w, &b) in ws.iter().zip(words.iter()) {
                w.store(b, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Loads `out.len()` values from byte `offset` (data ordering).
    pub fn read(&self, offset: u64, out: &mut [f32]) -> Result<()> {
        let span = self.span(offset, out.len())?;
        let per = 8 / self.dtype.size();
        let mut buf = [0u64; BATCH];
        for (ws, os) in span.chunks(BATCH).zip(out.chunks_mut(BATCH * per)) {
            let words = &mut buf[..ws.len()];
            for (b, w) in words.iter_mut().zip(ws) {
                *b = w.load(Ordering::Relaxed);
            }
            decode_words(self.dtype, words, os);
        }
        Ok(())
    }

    /// `n` values from byte `offset`, for inspection after a forward.
    pub fn values(&self, offset: u64, n: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; n];
        self.read(offset, &mut out)?;
        Ok(out)
    }

    /// Copies `n` values from byte `from` of `src` to byte `to` of this heap, bit for bit
    /// (the put of a staged row).
    pub fn copy_from(&self, to: u64, src: &SymHeap, from: u64, n: usize) -> Result<()> {
        let s = src.span(from, n)?;
        for (d, w) in self.span(to, n)?.iter().zip(s) {
            d.store(w.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        Ok(())
    }

    /// The words `[offset, offset + 8 n)`, `offset` 8-aligned.
    fn words_at(&self, offset: u64, n: usize) -> Result<&[AtomicU64]> {
        let bad = || Error::Device {
            rank: self.rank,
            stage: "heap",
            what: format!("{n} words at offset {offset}: outside the heap or misaligned"),
            expected: self.bytes(),
            observed: offset.saturating_add(8 * n as u64),
        };
        if !offset.is_multiple_of(8) {
            return Err(bad());
        }
        let a = (offset / 8) as usize;
        self.words.get(a..a.saturating_add(n)).ok_or_else(bad)
    }

    /// Stores raw 64-bit words at byte `offset` (data ordering): metadata.
    pub fn write_words(&self, offset: u64, words: &[u64]) -> Result<()> {
        for (w, &v) in self.words_at(offset, words.len())?.iter().zip(words) {
            w.store(v, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Loads raw 64-bit words from byte `offset` (data ordering).
    pub fn read_words(&self, offset: u64, out: &mut [u64]) -> Result<()> {
        let span = self.words_at(offset, out.len())?;
        for (o, w) in out.iter_mut().zip(span) {
            *o = w.load(Ordering::Relaxed);
        }
        Ok(())
    }

    /// Stores `values` as little-endian u32s at byte `offset` (8-aligned); an odd count
    /// also zeroes the u32 after the last (the rest of its word).
    pub fn write_u32s(&self, offset: u64, values: &[u32]) -> Result<()> {
        self.write_words(offset, &u32_words(values))
    }

    /// Loads `out.len()` little-endian u32s from byte `offset` (8-aligned).
    pub fn read_u32s(&self, offset: u64, out: &mut [u32]) -> Result<()> {
        let mut words = vec![0u64; out.len().div_ceil(2)];
        self.read_words(offset, &mut words)?;
        for (i, o) in out.iter_mut().enumerate() {
            *o = (words[i / 2] >> (32 * (i % 2))) as u32;
        }
        Ok(())
    }

    /// Copies `n` raw words from byte `from` of `src` to byte `to` of this heap (the put of
    /// staged metadata).
    pub fn copy_words_from(&self, to: u64, src: &SymHeap, from: u64, n: usize) -> Result<()> {
        for (d, w) in self.words_at(to, n)?.iter().zip(src.words_at(from, n)?) {
            d.store(w.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        Ok(())
    }

    fn word(&self, offset: u64) -> Result<&AtomicU64> {
        let bad = || Error::Device {
            rank: self.rank,
            stage: "heap",
            what: format!("signal word at offset {offset} outside the heap or misaligned"),
            expected: self.bytes(),
            observed: offset,
        };
        if !offset.is_multiple_of(8) {
            return Err(bad());
        }
        self.words.get((offset / 8) as usize).ok_or_else(bad)
    }

    /// Publishes a signal word at byte `offset` (release: orders the data written before).
    pub fn signal(&self, offset: u64, word: u64) -> Result<()> {
        self.word(offset)?.store(word, Ordering::Release);
        Ok(())
    }

    /// Reads the signal word at byte `offset` (acquire).
    pub fn load_signal(&self, offset: u64) -> Result<u64> {
        Ok(self.word(offset)?.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_through_the_dtype() {
        for dtype in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
            let heap = SymHeap::new(0, 256, dtype).expect("heap");
            let v: Vec<f32> = (0..16).map(|i| i as f32 * 0.3 - 2.0).collect();
            heap.write(64, &v).expect("write");
            let back = heap.values(64, 16).expect("read");
            for (a, b) in v.iter().zip(&back) {
                assert_eq!(dtype.round(*a), *b, "{dtype:?}");
            }
            // The neighbouring bytes are untouched.
            let before = heap.values(56, 8 / dtype.size()).expect("read");
            assert!(before.iter().all(|&x| x == 0.0), "{dtype:?}: {before:?}");
        }
    }

    #[test]
    fn bf16_bytes_are_little_endian_device_layout() {
        let heap = SymHeap::new(0, 64, Dtype::Bf16).expect("heap");
        heap.write(0, &[1.0, -2.0, 0.5, 3.0]).expect("write");
        let word = heap.load_signal(0).expect("word");
        let want = [1.0f32, -2.0, 0.5, 3.0]
            .iter()
            .enumerate()
            .fold(0u64, |acc, (i, &v)| {
                acc | (u64::from(half::bf16::from_f32(v).to_bits()) << (16 * i))
            });
        assert_eq!(word, want);
    }

    #[test]
    fn out_of_range_and_misaligned_accesses_are_errors() {
        let heap = SymHeap::new(3, 64, Dtype::F32).expect("heap");
        assert!(matches!(
            heap.write(56, &[0.0; 4]),
            Err(Error::Device { rank: 3, .. })
        ));
        assert!(matches!(
            heap.write(4, &[0.0; 2]),
            Err(Error::Device { .. })
        ));
        assert!(matches!(
            heap.write(0, &[0.0; 3]),
            Err(Error::Device { .. })
        ));
        assert!(matches!(heap.signal(64, 1), Err(Error::Device { .. })));
        assert!(matches!(heap.load_signal(12), Err(Error::Device { .. })));
        assert!(matches!(
            SymHeap::new(0, 12, Dtype::F32),
            Err(Error::PlanTooLarge { .. })
        ));
    }

    #[test]
    fn metadata_words_round_trip_and_stay_in_bounds() {
        let a = SymHeap::new(0, 64, Dtype::Bf16).expect("heap");
        a.write_u32s(8, &[1, 2, 3]).expect("write");
        let mut back = [0u32; 4];
        a.read_u32s(8, &mut back).expect("read");
        assert_eq!(back, [1, 2, 3, 0]);
        let b = SymHeap::new(1, 64, Dtype::Bf16).expect("heap");
        b.copy_words_from(32, &a, 8, 2).expect("copy");
        let mut w = [0u64; 2];
        b.read_words(32, &mut w).expect("read");
        assert_eq!(w, [1 | (2 << 32), 3]);
        assert!(a.write_words(60, &[0]).is_err());
        assert!(a.write_u32s(56, &[1, 2, 3]).is_err());
    }

    #[test]
    fn copy_moves_bits_between_heaps() {
        let a = SymHeap::new(0, 128, Dtype::F16).expect("heap");
        let b = SymHeap::new(1, 128, Dtype::F16).expect("heap");
        a.write(32, &[1.5, 2.5, -0.25, 7.0]).expect("write");
        b.copy_from(96, &a, 32, 4).expect("copy");
        assert_eq!(b.values(96, 4).expect("read"), vec![1.5, 2.5, -0.25, 7.0]);
    }
}
