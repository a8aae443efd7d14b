//! `bench link`: what encrypting a peer link costs in CPU, on its own, without the network or
//! the disk that dominate the broker figures.
//!
//! 1. Derive the link key from a fresh random secret and run the Noise handshake in memory,
//!    exactly as two brokers do ([`federation::noise`]).
//! 2. On one thread, seal `frames` peer frames of `size` bytes and open them again (both
//!    directions' work for one frame); time it.
//! 3. For comparison, the same frames copied once each (about what the plaintext path does
//!    with a frame's bytes besides writing them).
//!
//! Frames and MiB per second; the share of one core a given link rate takes follows from it.

use std::time::Instant;

use anyhow::Context;
use federation::auth::Secret;
use federation::noise::{self, Initiator};
use federation::wire::Hello;

use super::Metrics;

#[derive(Clone, Debug)]
pub struct Params {
    pub frames: u64,
    pub size: usize,
}

pub async fn run(p: &Params) -> anyhow::Result<Metrics> {
    anyhow::ensure!(p.frames >= 1, "--frames must be at least 1");
    anyhow::ensure!(
        (1..=16 * 1024 * 1024).contains(&p.size),
        "--size must be 1 byte to 16 MiB"
    );
    let p = p.clone();
    tokio::task::spawn_blocking(move || measure(&p))
        .await
        .context("the link measurement failed")?
}

fn measure(p: &Params) -> anyhow::Result<Metrics> {
    let secret = Secret::new(hex::encode(rand::random::<[u8; 32]>()).into_bytes())?;
    let hello = Hello::encrypted_peer().encode();
    let (init, first) = Initiator::start(&secret, &hello);
    let (acc, answer) = noise::respond(&secret, &hello, &first)?;
    let dialer = init.finish(&answer)?;
    let (mut seal, _) = dialer.split(p.size);
    let (_, mut open) = acc.split(p.size);
    let frame: Vec<u8> = (0..p.size).map(|i| (i % 251) as u8).collect();

    let start = Instant::now();
    let mut opened = 0u64;
    for _ in 0..p.frames {
        for m in seal.seal(&frame) {
            if let Some(f) = open.open(&m)? {
                opened += f.len() as u64;
            }
        }
    }
    let sealed_secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(
        opened == p.frames * p.size as u64,
        "frames lost in the measurement"
    );

    let start = Instant::now();
    let mut sum = 0u64;
    for _ in 0..p.frames {
        let copy = std::hint::black_box(frame.clone());
        sum += copy[copy.len() - 1] as u64;
    }
    std::hint::black_box(sum);
    let copy_secs = start.elapsed().as_secs_f64().max(1e-9);

    let mib = (p.frames * p.size as u64) as f64 / (1024.0 * 1024.0);
    let round = |x: f64| (x * 10.0).round() / 10.0;
    Ok(vec![
        (
            "seal_open_frames_per_sec",
            (p.frames as f64 / sealed_secs).round(),
        ),
        ("seal_open_mib_per_sec", round(mib / sealed_secs)),
        ("copy_mib_per_sec", round(mib / copy_secs)),
        ("size", p.size as f64),
        ("frames", p.frames as f64),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn it_measures_and_every_frame_round_trips() {
        let m = run(&Params {
            frames: 20,
            size: 70_000,
        })
        .await
        .unwrap();
        let get = |k: &str| m.iter().find(|(n, _)| *n == k).unwrap().1;
        assert!(get("seal_open_mib_per_sec") > 0.0);
        assert_eq!(get("frames"), 20.0);
        assert!(run(&Params { frames: 0, size: 1 }).await.is_err());
    }
}
