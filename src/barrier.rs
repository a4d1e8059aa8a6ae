//! A barrier for the threads of one ggml op call.
//!
//! ggml runs a custom op on all `nth` threads of the graph at once and puts its own barrier only
//! between nodes; the one-token decode path needs steps inside the op (all logits before any
//! softmax over them), so it waits here. The count is reset by the last thread to arrive, so
//! calls with different thread counts may follow each other.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

#[derive(Default)]
pub struct SpinBarrier {
    arrived: AtomicUsize,
    generation: AtomicUsize,
}

/// Longer than any step takes; a thread that waits this long means a sibling died in the op
/// (which cannot happen short of a bug), and an error beats a hang.
const GIVE_UP: Duration = Duration::from_secs(60);

impl SpinBarrier {
    /// Wait until `n` threads have called this (for this round).
    pub fn wait(&self, n: usize) -> Result<()> {
        if n <= 1 {
            return Ok(());
        }
        let gen = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == n {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return Ok(());
        }
        let start = Instant::now();
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == gen {
            spins += 1;
            if spins < 2000 {
                std::hint::spin_loop();
            } else {
                // more threads than cores: let the late ones run
                std::thread::yield_now();
                if spins.is_multiple_of(1024) && start.elapsed() > GIVE_UP {
                    return Err(Error::Request("an attention thread did not reach the step barrier".into()));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_thread_sees_every_write_of_the_step_before() {
        let b = SpinBarrier::default();
        let slots: Vec<AtomicU64> = (0..4).map(|_| AtomicU64::new(0)).collect();
        for n in [4usize, 3, 4, 2] {
            std::thread::scope(|s| {
                for ith in 0..n {
                    let (b, slots) = (&b, &slots);
                    s.spawn(move || {
                        for round in 1..200u64 {
                            slots[ith].store(round, Ordering::Relaxed);
                            b.wait(n).unwrap();
                            for x in &slots[..n] {
                                assert_eq!(x.load(Ordering::Relaxed), round);
                            }
                            b.wait(n).unwrap();
                        }
                    });
                }
            });
        }
    }
}
