//! Soak: thousands of short requests back to back through the plugin, with
//! RSS, slot use and latency trend checked at the end. Exits 1 when a bound
//! is broken. Run by `scripts/soak.sh` (bounded in time), not by the tests.
//!
//! `cargo run --example soak -- [REQUESTS=2000]`

use std::time::{Duration, Instant};

use bevy::prelude::*;
use bevy_npc_llm::prelude::*;

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Run `n` requests back to back, `wave` in flight; finished requests are
/// despawned as a game would. Returns the latencies and the RSS when the
/// first `warm` had finished (one continuous stream: no drained pipeline
/// between warm-up and measurement).
fn run(app: &mut App, npcs: &[Entity], n: usize, wave: usize, warm: usize) -> (Vec<Duration>, u64) {
    let mut latencies = Vec::with_capacity(n);
    let mut rss_warm = 0;
    let mut pending: Vec<(Entity, Instant)> = Vec::new();
    let mut sent = 0;
    let start = Instant::now();
    while latencies.len() < n {
        while sent < n && pending.len() < wave {
            let npc = npcs[sent % npcs.len()];
            let e = app
                .world_mut()
                .spawn(
                    LlmRequest::raw(format!(
                        "Villager {} greets the traveler number {sent}.",
                        sent % 12
                    ))
                    .with_cache_key(npc)
                    .with_max_tokens(4),
                )
                .id();
            pending.push((e, Instant::now()));
            sent += 1;
        }
        app.update();
        let mut finished = Vec::new();
        pending.retain(|(e, t)| {
            let status = app.world().get::<LlmRequestStatus>(*e).cloned();
            match status {
                Some(s) if s.is_finished() => {
                    if let RequestState::Failed(err) = &s.state {
                        eprintln!("request failed: {err}");
                        std::process::exit(1);
                    }
                    latencies.push(t.elapsed());
                    finished.push(*e);
                    false
                }
                _ => true,
            }
        });
        for e in finished {
            app.world_mut().despawn(e);
        }
        if rss_warm == 0 && latencies.len() >= warm {
            rss_warm = rss_kb();
        }
        std::thread::sleep(Duration::from_micros(300));
        assert!(
            start.elapsed() < Duration::from_secs(1200),
            "soak timed out"
        );
    }
    (latencies, rss_warm)
}

fn mean(d: &[Duration]) -> f64 {
    d.iter().map(Duration::as_secs_f64).sum::<f64>() / d.len().max(1) as f64 * 1e3
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let mut app = App::new();
    app.add_plugins(MinimalPlugins).add_plugins(
        NpcLlmPlugin::default()
            .with_settings(LlmSettings {
                model: "smollm2-135m-instruct-q4_1".into(),
                context_per_sequence: 256,
                ..Default::default()
            })
            .with_load_on_startup(true),
    );
    let npcs: Vec<Entity> = (0..12)
        .map(|_| app.world_mut().spawn_empty().id())
        .collect();
    let t0 = Instant::now();
    let warm = 200;
    let (all, rss_warm) = run(&mut app, &npcs, warm + n, 16, warm);
    let rss_end = rss_kb();
    let lat = &all[warm..];
    let tenth = (n / 10).max(1);
    let (first, last) = (mean(&lat[..tenth]), mean(&lat[n - tenth..]));
    let c = app.world().resource::<LlmEngineStats>().counters.clone();
    let growth = (rss_end as f64 - rss_warm as f64) / rss_warm.max(1) as f64 * 100.0;
    println!(
        "soak: {warm} warm-up + {n} requests in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    println!(
        "RSS after warm-up {:.1} MB, at the end {:.1} MB: growth {growth:.2}%",
        rss_warm as f64 / 1024.0,
        rss_end as f64 / 1024.0
    );
    println!(
        "latency mean: first 10% {first:.1} ms, last 10% {last:.1} ms (ratio {:.2})",
        last / first
    );
    let deciles: Vec<String> = lat
        .chunks(tenth)
        .map(|c| format!("{:.0}", mean(c)))
        .collect();
    println!("latency mean per tenth (ms): {}", deciles.join(" "));
    println!(
        "slots: {} active, {} queued, {} cached of {}; {} completed, {} failed, {} evictions",
        c.active_sequences, c.queued, c.cached_slots, c.slots, c.completed, c.failed, c.evictions
    );
    let mut ok = true;
    if growth >= 5.0 {
        println!("FAIL: RSS grew {growth:.2}% (bound 5%)");
        ok = false;
    }
    if last / first > 1.5 {
        println!("FAIL: latency trend {:.2} (bound 1.5)", last / first);
        ok = false;
    }
    if c.active_sequences != 0 || c.queued != 0 || c.cached_slots > c.slots {
        println!("FAIL: slots not freed");
        ok = false;
    }
    std::process::exit(if ok { 0 } else { 1 });
}
