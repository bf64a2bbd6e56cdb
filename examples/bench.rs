//! Benchmarks, all in one run on one model, threads and sampling:
//! binding overhead, many NPCs batched vs sequential, prefix cache, frame
//! time, memory and player-first latency.
//!
//! ```text
//! cargo run --release --example bench -- [--model ID] [--npcs 1,2,4,8,16] [--tokens 64]
//!     [--threads N] [--gpu-layers N] [--sections binding,npcs,cache,frames,memory,player,constrained,compile,seed,arrivals,kv_restore]
//!     [--json] [--json-out FILE]
//!     [--remote URL]
//!     [--device-sampling on|off] [--kv-unified on|off] [--fill-gaps on|off] [--even-prompts on|off] [--round-prompts on|off]
//!     [--flash-attn on|off|auto]
//!     [--sampling-threads N] [--lanes N] [--sequences N] [--no-sequential] [--comparators FILE] [--label TEXT]
//!     [--arrivals N] [--reps K]
//!
//! `--reps K` (default 1) measures each N of the `npcs` section K times on the
//! same engine and reports the run with the median generation rate (its
//! breakdown too), and takes the second-turn TTFT of `cache` as the median of
//! max(K, 3) repetitions: on a GPU a 128-token run of 8 NPCs lasts 0.3 s and
//! moves by ±10 % from one run to the next.
//!
//! The GPU knobs set `LlmSettings::gpu` (on a CPU plan only `--device-sampling on`
//! and `--lanes N` apply). `--sequences N` sizes the `npcs` section's engine
//! for at least N sequences (a game's plan, fewer NPCs talking).
//! `--comparators FILE` reads llama.cpp's own figures measured on the same
//! machine (scripts/gpu/comparators.py writes it: llama-bench `tg`,
//! llama-batched-bench `S_TG` per B, llama-server's aggregate per N) and adds
//! our ratios to them, each with its target, to the table and the JSON.
//!
//! `--remote URL` (an OpenAI-compatible server such as `llama-server -np 8`)
//! runs the `remote` section: the same N-NPC load through the remote backend
//! and through the local engine, aggregate tokens/s side by side.
//! ```
//! Prints a table; with `--json` also one JSON object per figure; with
//! `--json-out FILE` writes every figure, its target and whether it was met
//! as one JSON document (keep it beside the log).

use std::time::{Duration, Instant};

use bevy::prelude::*;
use bevy_npc_llm::EngineCounters;
use bevy_npc_llm::hardware::BackendStatus;
use bevy_npc_llm::prelude::*;
use bevy_npc_llm::registry::ModelRegistry;
use bevy_npc_llm::settings::{GpuLayers, SamplingOverrides};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;

struct Args {
    model: Option<String>,
    npcs: Vec<usize>,
    tokens: u32,
    threads: u32,
    gpu_layers: Option<u32>,
    sections: Vec<String>,
    json: bool,
    remote: Option<String>,
    /// Write every figure and its target as one JSON document here.
    json_out: Option<String>,
    device_sampling: Option<bool>,
    kv_unified: Option<bool>,
    fill_gaps: Option<bool>,
    even_prompt_steps: Option<bool>,
    round_prompt_steps: Option<bool>,
    flash_attn: Option<Option<bool>>,
    sampling_threads: Option<u32>,
    /// NPCs at a time in the `arrivals` section.
    arrivals: usize,
    lanes: Option<u32>,
    /// `--sequences N`: the npcs section's engine sized for at least N
    /// sequences (a game's plan) whatever the NPCs talking.
    sequences: Option<u32>,
    /// Skip the one-slot sequential comparison in `npcs`.
    no_sequential: bool,
    /// Repetitions of each `npcs` measurement (the median run is reported).
    reps: usize,
    /// llama.cpp's figures on this machine (JSON), for the ratios.
    comparators: Option<serde_json::Value>,
    label: Option<String>,
}

#[path = "bench_sections/kv_restore.rs"]
mod kv_restore;

fn on_off(v: &str) -> bool {
    match v {
        "on" | "true" | "1" => true,
        "off" | "false" | "0" => false,
        other => panic!("expected on or off, got {other}"),
    }
}

fn parse_args() -> Args {
    let mut a = Args {
        model: None,
        npcs: vec![1, 2, 4, 8, 16],
        tokens: 64,
        threads: 0,
        gpu_layers: None,
        sections: [
            "binding",
            "npcs",
            "cache",
            "frames",
            "memory",
            "player",
            "constrained",
            "compile",
            "seed",
        ]
        .map(String::from)
        .to_vec(),
        json: false,
        remote: None,
        json_out: None,
        device_sampling: None,
        kv_unified: None,
        fill_gaps: None,
        even_prompt_steps: None,
        round_prompt_steps: None,
        flash_attn: None,
        sampling_threads: None,
        arrivals: 16,
        lanes: None,
        sequences: None,
        no_sequential: false,
        reps: 1,
        comparators: None,
        label: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => a.model = Some(val()),
            "--npcs" => {
                a.npcs = val()
                    .split(',')
                    .map(|n| n.trim().parse().unwrap())
                    .collect()
            }
            "--tokens" => a.tokens = val().parse().unwrap(),
            "--threads" => a.threads = val().parse().unwrap(),
            "--gpu-layers" => a.gpu_layers = Some(val().parse().unwrap()),
            "--sections" => a.sections = val().split(',').map(String::from).collect(),
            "--json" => a.json = true,
            "--json-out" => a.json_out = Some(val()),
            "--device-sampling" => a.device_sampling = Some(on_off(&val())),
            "--kv-unified" => a.kv_unified = Some(on_off(&val())),
            "--fill-gaps" => a.fill_gaps = Some(on_off(&val())),
            "--even-prompts" => a.even_prompt_steps = Some(on_off(&val())),
            "--round-prompts" => a.round_prompt_steps = Some(on_off(&val())),
            "--flash-attn" => {
                let v = val();
                a.flash_attn = Some((v != "auto").then(|| on_off(&v)));
            }
            "--sampling-threads" => a.sampling_threads = Some(val().parse().unwrap()),
            "--lanes" => a.lanes = Some(val().parse().unwrap()),
            "--sequences" => a.sequences = Some(val().parse().unwrap()),
            "--arrivals" => a.arrivals = val().parse().unwrap(),
            "--no-sequential" => a.no_sequential = true,
            "--reps" => {
                a.reps = val()
                    .parse::<usize>()
                    .expect("--reps takes a whole number")
                    .max(1)
            }
            "--label" => a.label = Some(val()),
            "--comparators" => {
                let path = val();
                let text = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
                a.comparators = Some(serde_json::from_str(&text).expect("comparators JSON"));
            }
            "--remote" => {
                a.remote = Some(val());
                a.sections = vec!["remote".into()];
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => {
                eprintln!("bench: unknown flag {other}\n\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    a
}

/// The flags (the module docs say what each section measures).
const USAGE: &str = "usage: bench [--model ID] [--npcs 1,2,4,8,16] [--tokens 64]
    [--threads N] [--gpu-layers N]
    [--sections binding,npcs,cache,frames,memory,player,constrained,compile,seed,arrivals,kv_restore]
    [--json] [--json-out FILE] [--remote URL]
    [--device-sampling on|off] [--kv-unified on|off] [--fill-gaps on|off]
    [--even-prompts on|off] [--round-prompts on|off] [--flash-attn on|off|auto]
    [--sampling-threads N] [--lanes N] [--sequences N] [--no-sequential]
    [--comparators FILE] [--label TEXT] [--arrivals N] [--reps K]";

struct Figures {
    rows: Vec<(String, String, f64, String)>,
    json: bool,
}

impl Figures {
    fn add(&mut self, section: &str, name: &str, value: f64, unit: &str) {
        println!("  {section:<8} {name:<52} {value:>12.3} {unit}");
        if self.json {
            println!(
                "{{\"section\":\"{section}\",\"name\":\"{}\",\"value\":{value},\"unit\":\"{unit}\"}}",
                name.replace('"', "'")
            );
        }
        self.rows
            .push((section.into(), name.into(), value, unit.into()));
    }
}

fn base_settings(args: &Args) -> LlmSettings {
    let mut s = LlmSettings {
        threads: args.threads,
        context_per_sequence: 1024,
        max_parallel_sequences: 8,
        ..Default::default()
    };
    if let Some(m) = &args.model {
        s.model.clone_from(m);
    }
    if let Some(n) = args.gpu_layers {
        s.gpu_layers = GpuLayers::Count(n);
    }
    if let Some(v) = args.device_sampling {
        s.gpu.device_sampling = Some(v);
    }
    if let Some(v) = args.fill_gaps {
        s.gpu.fill_gaps = Some(v);
    }
    if let Some(v) = args.even_prompt_steps {
        s.gpu.even_prompt_steps = Some(v);
    }
    if let Some(v) = args.round_prompt_steps {
        s.gpu.round_prompt_steps = Some(v);
    }
    if let Some(v) = args.kv_unified {
        s.gpu.kv_unified = Some(v);
    }
    if let Some(v) = args.flash_attn {
        s.gpu.flash_attention = v;
    }
    if let Some(v) = args.sampling_threads {
        s.gpu.sampling_threads = v;
    }
    if let Some(v) = args.lanes {
        s.gpu.lanes = v;
    }
    // Sampling is the model's recommended one from the registry (what NPCs
    // use); only the binding section asks for greedy, like its plain loop.
    s.sampling.max_tokens = args.tokens;
    s.sampling.ignore_eos = true;
    s
}

fn ready_app(settings: LlmSettings) -> App {
    let mut app = App::new();
    app.add_plugins(MinimalPlugins).add_plugins(
        NpcLlmPlugin::default()
            .with_settings(settings)
            .with_load_on_startup(true),
    );
    let start = Instant::now();
    loop {
        app.update();
        match app.world().resource::<LlmModelState>() {
            LlmModelState::Ready(_) => break,
            LlmModelState::Failed { error, .. } => panic!("model failed to load: {error}"),
            _ => {}
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "model load timed out"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Warm-up (first decodes allocate compute buffers), as a game would at load.
    let _ = run(&mut app, vec![LlmRequest::raw("Hello").with_max_tokens(4)]);
    app
}

/// Whether every entity's request status satisfies `ok`.
fn all_status(w: &World, es: &[Entity], ok: impl Fn(&LlmRequestStatus) -> bool) -> bool {
    es.iter()
        .all(|e| w.get::<LlmRequestStatus>(*e).is_some_and(&ok))
}

/// Update until every entity's status satisfies `ok` (panics after 600 s).
fn update_until(app: &mut App, es: &[Entity], ok: impl Fn(&LlmRequestStatus) -> bool) {
    let start = Instant::now();
    loop {
        app.update();
        if all_status(app.world(), es, &ok) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "requests timed out"
        );
        // A game's frame loop yields between frames; a spinning one would
        // steal a core from inference on small machines.
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Spawn requests, update until all finish; returns statuses and wall time.
fn run(app: &mut App, reqs: Vec<LlmRequest>) -> (Vec<LlmRequestStatus>, Duration) {
    let start = Instant::now();
    let es: Vec<Entity> = reqs
        .into_iter()
        .map(|r| app.world_mut().spawn(r).id())
        .collect();
    update_until(app, &es, LlmRequestStatus::is_finished);
    let wall = start.elapsed();
    let out = es
        .iter()
        .map(|e| app.world().get::<LlmRequestStatus>(*e).unwrap().clone())
        .collect::<Vec<_>>();
    for (e, s) in es.iter().zip(&out) {
        if let RequestState::Failed(err) = &s.state {
            panic!("request failed: {err}");
        }
        app.world_mut().despawn(*e);
    }
    (out, wall)
}

const TOPICS: [&str; 16] = [
    "bread", "swords", "flowers", "rain", "cats", "boats", "songs", "stars", "wheat", "wolves",
    "rivers", "lanterns", "honey", "bells", "maps", "owls",
];

fn npc_request(i: usize) -> LlmRequest {
    LlmRequest::chat([
        ChatMessage::system(format!(
            "You are villager number {i}. You talk about {} all day.",
            TOPICS[i % 16]
        )),
        ChatMessage::user(format!("Tell me everything about {}.", TOPICS[i % 16])),
    ])
}

const RAW_PROMPT: &str = "The old blacksmith looked up from his anvil and said";

fn binding(args: &Args, f: &mut Figures) {
    // One slot, as the plain loop's context has one sequence.
    let mut s = base_settings(args);
    s.max_parallel_sequences = 1;
    let mut app = ready_app(s);
    let plan = app
        .world()
        .resource::<BackendStatus>()
        .plan
        .clone()
        .unwrap();
    let path = {
        let reg = app.world().resource::<ModelRegistry>();
        reg.path_of(reg.get(&plan.model).unwrap())
    };
    // The same work in a plain llama-cpp-2 loop, same model file, threads and layers.
    let backend = bevy_npc_llm::llama_backend().unwrap();
    let model = LlamaModel::load_from_file(
        backend,
        &path,
        &LlamaModelParams::default().with_n_gpu_layers(plan.engine.gpu_layers),
    )
    .unwrap();
    let mut ctx = model
        .new_context(
            backend,
            LlamaContextParams::default()
                .with_n_ctx(std::num::NonZeroU32::new(1024))
                .with_n_batch(512)
                .with_n_threads(plan.engine.threads as i32)
                .with_n_threads_batch(plan.engine.threads as i32),
        )
        .unwrap();
    let vocab = model.vocab();
    let mut tokens = Vec::new();
    if vocab.should_add_bos() {
        tokens.push(vocab.bos());
    }
    tokens.extend(vocab.tokenize(RAW_PROMPT.as_bytes(), false, false));
    let mut batch = LlamaBatch::new(512, 1);
    let mut plain_run = || {
        ctx.clear_kv_cache();
        batch.clear();
        for (i, t) in tokens.iter().enumerate() {
            batch
                .add(*t, i as i32, &[0], i + 1 == tokens.len())
                .unwrap();
        }
        ctx.decode(&mut batch).unwrap();
        let mut sampler = LlamaSampler::greedy();
        let mut idx = batch.n_tokens() - 1;
        let mut first = None;
        for (n, pos) in (0..args.tokens).zip(tokens.len() as i32..) {
            let tok = sampler.sample(&ctx, idx);
            let _piece = vocab.token_to_piece(tok, false, None);
            if n == 0 {
                first = Some(Instant::now());
            }
            if n + 1 == args.tokens {
                break;
            }
            batch.clear();
            batch.add(tok, pos, &[0], true).unwrap();
            ctx.decode(&mut batch).unwrap();
            idx = 0;
        }
        (args.tokens - 1) as f64 / first.unwrap().elapsed().as_secs_f64()
    };
    // Alternate the two, five rounds, medians: this machine may be noisy.
    let (mut ours, mut plain) = (Vec::new(), Vec::new());
    let c0 = app.world().resource::<LlmEngineStats>().counters.clone();
    for _ in 0..5 {
        // Greedy, no repeat penalty: exactly what the plain loop does.
        let req = LlmRequest::raw(RAW_PROMPT)
            .with_temperature(0.0)
            .with_sampling(SamplingOverrides {
                temperature: Some(0.0),
                repeat_penalty: Some(1.0),
                ..Default::default()
            });
        let (st, _) = run(&mut app, vec![req]);
        let s = &st[0].stats;
        ours.push((s.generated_tokens - 1) as f64 / s.generation_time.as_secs_f64());
        plain.push(plain_run());
    }
    let c1 = settled_counters(&mut app, &c0, 5);
    let (ours, plain) = (percentile(&mut ours, 0.5), percentile(&mut plain, 0.5));
    // Where a single stream's step goes (the five runs' decode steps,
    // prompt steps included: 1 in ~128).
    let steps = (c1.decode_calls - c0.decode_calls).max(1);
    for (what, d) in [
        ("llama_decode call", c1.decode_time - c0.decode_time),
        ("device wait (synchronize)", c1.sync_time - c0.sync_time),
        ("token choice", c1.pick_time - c0.pick_time),
        ("text + events", c1.deliver_time - c0.deliver_time),
    ] {
        f.add(
            "binding",
            &format!("plugin per step: {what}"),
            d.as_secs_f64() * 1e3 / steps as f64,
            "ms",
        );
    }
    f.add(
        "binding",
        "plugin single-stream generation (median of 5)",
        ours,
        "tok/s",
    );
    f.add(
        "binding",
        "plain llama-cpp-2 loop, same prompt (median of 5)",
        plain,
        "tok/s",
    );
    f.add(
        "binding",
        "ratio plugin / plain (target >= 0.95)",
        ours / plain,
        "x",
    );
    if let Some(tg) = comparator(args, "llama_bench_tg", None) {
        f.add("binding", "llama-bench tg (same machine)", tg, "tok/s");
        f.add(
            "binding",
            "plugin single stream / llama-bench tg (target >= 0.95)",
            ours / tg,
            "x",
        );
    }
    if let Some(tg) = comparator_same(args, "llama_bench_tg", None) {
        f.add(
            "binding",
            "llama-bench tg, built from the plugin's llama.cpp",
            tg,
            "tok/s",
        );
        f.add(
            "binding",
            "plugin single stream / same llama.cpp's llama-bench tg (target >= 0.95)",
            ours / tg,
            "x",
        );
    }
}

/// A comparator figure: `key` of the comparators JSON, then `sub` (B or N).
fn comparator(args: &Args, key: &str, sub: Option<usize>) -> Option<f64> {
    comparator_in(args.comparators.as_ref()?, key, sub)
}

/// The same figure from llama.cpp's tools built from the plugin's own
/// llama.cpp (`same_llama_cpp` in the comparators JSON), if measured.
fn comparator_same(args: &Args, key: &str, sub: Option<usize>) -> Option<f64> {
    comparator_in(args.comparators.as_ref()?.get("same_llama_cpp")?, key, sub)
}

fn comparator_in(doc: &serde_json::Value, key: &str, sub: Option<usize>) -> Option<f64> {
    let v = doc.get(key)?;
    match sub {
        Some(n) => v.get(n.to_string())?.as_f64(),
        None => v.as_f64(),
    }
}

fn npcs(args: &Args, f: &mut Figures) {
    let max_n = *args.npcs.iter().max().unwrap();
    let mut s = base_settings(args);
    s.prefix_cache = false;
    s.context_per_sequence = 512;
    s.queue_capacity = max_n as u32;
    s.max_parallel_sequences = 1;
    s.batch_size = s.batch_size.max(max_n as u32 + 2);
    let mut sequential = (!args.no_sequential).then(|| ready_app(s.clone()));
    let mut max_batch = 0;
    let mut served_at_reading_speed = 0;
    for &n in &args.npcs {
        // An engine sized for N NPCs (llama.cpp's per-step cost grows with
        // the sequences a context holds, used or not).
        s.max_parallel_sequences = (n as u32).max(args.sequences.unwrap_or(0));
        let mut batched = ready_app(s.clone());
        let plan = batched
            .world()
            .resource::<BackendStatus>()
            .plan
            .clone()
            .unwrap();
        if plan.engine.sequences < n as u32 {
            println!(
                "  note: memory allowed only {} parallel sequences",
                plan.engine.sequences
            );
        }
        let reqs = || (0..n).map(npc_request).collect::<Vec<_>>();
        // Each NPC's own generation rate after its first token.
        let per_npc_rates = |bs: &[LlmRequestStatus]| -> Vec<f64> {
            bs.iter()
                .map(|s| f64::from(s.stats.tokens_per_second))
                .collect()
        };
        // `--reps K`: K runs on this engine, the one with the median
        // generation rate reported (with its own breakdown).
        let mut runs: Vec<_> = (0..args.reps)
            .map(|_| {
                let d0 = batched
                    .world()
                    .resource::<LlmEngineStats>()
                    .counters
                    .clone();
                let (bs, bw) = run(&mut batched, reqs());
                let d1 = batched
                    .world()
                    .resource::<LlmEngineStats>()
                    .counters
                    .clone();
                // Generation alone, as llama-batched-bench's S_TG counts
                // it: the NPCs' own rates summed (they run together).
                (per_npc_rates(&bs).iter().sum::<f64>(), bs, bw, d0, d1)
            })
            .collect();
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        if args.reps > 1 {
            f.add(
                "npcs",
                &format!("N={n:<2} generation rate, slowest of {} runs", args.reps),
                runs[0].0,
                "tok/s",
            );
            f.add(
                "npcs",
                &format!("N={n:<2} generation rate, fastest of {} runs", args.reps),
                runs[args.reps - 1].0,
                "tok/s",
            );
        }
        let (gen_rate, bs, bw, d0, d1) = runs.swap_remove(args.reps / 2);
        let b = aggregate(&bs, bw);
        f.add("npcs", &format!("N={n:<2} batched aggregate"), b, "tok/s");
        let mut per_npc = per_npc_rates(&bs);
        f.add(
            "npcs",
            &format!("N={n:<2} batched generation rate (sum of per-NPC tok/s)"),
            gen_rate,
            "tok/s",
        );
        let median = percentile(&mut per_npc, 0.5);
        f.add(
            "npcs",
            &format!("N={n:<2} per-NPC generation rate (median)"),
            median,
            "tok/s",
        );
        if median >= 10.0 {
            served_at_reading_speed = served_at_reading_speed.max(n);
        }
        if let Some(app) = sequential.as_mut() {
            let (ss, sw) = run(app, reqs());
            let q = aggregate(&ss, sw);
            f.add(
                "npcs",
                &format!("N={n:<2} sequential aggregate"),
                q,
                "tok/s",
            );
            f.add(
                "npcs",
                &format!("N={n:<2} batched / sequential"),
                b / q,
                "x",
            );
        }
        let steps = d1.decode_calls - d0.decode_calls;
        if steps > 0 {
            let per_step = |d: Duration| d.as_secs_f64() * 1e3 / steps as f64;
            for (what, d) in [
                ("batch build", d1.batch_time - d0.batch_time),
                ("llama_decode call", d1.decode_time - d0.decode_time),
                ("device wait (synchronize)", d1.sync_time - d0.sync_time),
                (
                    "token choice (logits/candidates + draw)",
                    d1.pick_time - d0.pick_time,
                ),
                ("text + events", d1.deliver_time - d0.deliver_time),
                (
                    "sampling total (wait + choice + events)",
                    d1.sample_time - d0.sample_time,
                ),
                ("wall", bw),
            ] {
                f.add(
                    "npcs",
                    &format!("N={n:<2} per step: {what}"),
                    per_step(d),
                    "ms",
                );
            }
            let generated = (d1.generated_tokens - d0.generated_tokens).max(1);
            f.add(
                "npcs",
                &format!("N={n:<2} tokens with device top-k"),
                (d1.device_sampled_tokens - d0.device_sampled_tokens) as f64 * 100.0
                    / generated as f64,
                "%",
            );
            f.add(
                "npcs",
                &format!("N={n:<2} decode calls (all lanes)"),
                steps as f64,
                "steps",
            );
            f.add(
                "npcs",
                &format!("N={n:<2} even prompt steps"),
                (d1.even_prompt_steps - d0.even_prompt_steps) as f64,
                "steps",
            );
            f.add(
                "npcs",
                &format!("N={n:<2} prompt padding"),
                (d1.prompt_padding - d0.prompt_padding) as f64,
                "tokens",
            );
        }
        let ttft: Vec<f64> = bs
            .iter()
            .filter_map(|s| s.stats.time_to_first_token)
            .map(|d| d.as_secs_f64() * 1e3)
            .collect();
        f.add(
            "npcs",
            &format!("N={n:<2} batched mean time to first token"),
            ttft.iter().sum::<f64>() / ttft.len() as f64,
            "ms",
        );
        // Against llama.cpp's own figures, where the comparators file has them.
        for (key, what, ours, target) in [
            (
                "batched_bench_s_tg",
                format!("generation rate / llama-batched-bench S_TG B={n}"),
                gen_rate,
                "0.9",
            ),
            (
                "server_aggregate",
                format!("aggregate / llama-server -np {n}"),
                b,
                "1.5",
            ),
        ] {
            let target = if [8, 32, 128].contains(&n) {
                format!(" (target >= {target})")
            } else {
                String::new()
            };
            if let Some(theirs) = comparator(args, key, Some(n)) {
                f.add(
                    "npcs",
                    &format!("N={n:<2} {what}{target}"),
                    ours / theirs,
                    "x",
                );
            }
            if let Some(theirs) = comparator_same(args, key, Some(n)) {
                f.add(
                    "npcs",
                    &format!("N={n:<2} same llama.cpp: {what}{target}"),
                    ours / theirs,
                    "x",
                );
            }
        }
        let c = &batched.world().resource::<LlmEngineStats>().counters;
        max_batch = max_batch.max(c.max_batch_sequences);
    }
    f.add("npcs", "largest batch (sequences)", max_batch as f64, "seq");
    f.add(
        "npcs",
        "most NPCs measured at >= 10 tok/s each (median)",
        served_at_reading_speed as f64,
        "NPCs",
    );
}

/// The JSON every NPC answers in the `constrained` section: a long `say`
/// string, so generation runs to `max_tokens` as free text does.
const TURN_SCHEMA: &str = r#"{"type":"object","properties":{"say":{"type":"string","maxLength":4000},"mood":{"type":"integer","minimum":0,"maximum":10}},"required":["say","mood"]}"#;

/// Per-token cost of JSON-schema-constrained generation against free text,
/// same prompts, same engine, alternating runs (B = 1 and B = 8).
fn constrained(args: &Args, f: &mut Figures) {
    let mut s = base_settings(args);
    s.prefix_cache = false;
    s.context_per_sequence = 512;
    s.max_parallel_sequences = 8;
    s.queue_capacity = 16;
    let mut app = ready_app(s);
    let schema: serde_json::Value = serde_json::from_str(TURN_SCHEMA).unwrap();
    for n in [1usize, 8] {
        let mut wall = [Duration::ZERO; 2];
        let mut tokens = [0usize; 2];
        let mut steps = [0u64; 2];
        let mut sample = [Duration::ZERO; 2];
        let mut pick = [Duration::ZERO; 2];
        for round in 0..4 {
            for (k, constrain) in [false, true].into_iter().enumerate() {
                let reqs = (0..n)
                    .map(|i| {
                        let r = npc_request(i + round);
                        if constrain {
                            r.with_json_schema(&schema)
                        } else {
                            r
                        }
                    })
                    .collect();
                let c0 = app.world().resource::<LlmEngineStats>().counters.clone();
                let (done, w) = run(&mut app, reqs);
                let c1 = app.world().resource::<LlmEngineStats>().counters.clone();
                wall[k] += w;
                tokens[k] += done.iter().map(|s| s.stats.generated_tokens).sum::<usize>();
                steps[k] += c1.decode_calls - c0.decode_calls;
                sample[k] += c1.sample_time - c0.sample_time;
                pick[k] += c1.pick_time - c0.pick_time;
            }
        }
        let per_token = |k: usize| wall[k].as_secs_f64() * 1e3 / tokens[k].max(1) as f64;
        // Besides wall time: the constraint's own cost, token choice (mask +
        // draw) per token. (On a GPU a step costs about the same for 1 or 8
        // sequences, so wall time per token there mostly tells how many JSON
        // answers, which end at different lengths, were still running.)
        for (k, what) in ["free text", "JSON schema"].into_iter().enumerate() {
            let per_step = |d: Duration| d.as_secs_f64() * 1e3 / steps[k].max(1) as f64;
            for (figure, value, unit) in [
                ("wall time per generated token", per_token(k), "ms"),
                ("sampling time per step", per_step(sample[k]), "ms"),
                (
                    "token choice per generated token",
                    pick[k].as_secs_f64() * 1e3 / tokens[k].max(1) as f64,
                    "ms",
                ),
                (
                    "sequences per decode step",
                    tokens[k] as f64 / steps[k].max(1) as f64,
                    "seq",
                ),
            ] {
                f.add(
                    "constrained",
                    &format!("B={n} {what}: {figure}"),
                    value,
                    unit,
                );
            }
        }
        let target = if n == 8 { " (target <= 1.3)" } else { "" };
        f.add(
            "constrained",
            &format!("B={n} per-token time, JSON schema / free text{target}"),
            per_token(1) / per_token(0),
            "x",
        );
    }
}

/// How long one large constraint's compile stalls the other NPCs: 8 NPCs
/// stream free text; a request with a 5,000-value enum schema arrives;
/// each NPC's longest gap between two tokens while it compiles, against
/// their median gap (one decode step). Constraints compile on a thread of
/// their own, so the longest gap stays within two steps (at most one step
/// of stall). Round 0 is the model's first constrained request (the
/// vocabulary's token trie is built then too).
fn compile_stall(args: &Args, f: &mut Figures) {
    #[derive(Resource, Default)]
    struct Arrivals(Vec<(Entity, Instant)>);
    let mut s = base_settings(args);
    s.max_parallel_sequences = 10;
    s.sampling.max_tokens = 160;
    let mut app = ready_app(s);
    app.init_resource::<Arrivals>();
    app.add_observer(|e: On<LlmToken>, mut a: ResMut<Arrivals>| {
        a.0.push((e.entity, Instant::now()));
    });
    let values: Vec<String> = (0..5000)
        .map(|i| format!("item-{i:04}-{}", TOPICS[i % 16]))
        .collect();
    let schema = serde_json::json!({
        "type": "object",
        "properties": { "say": { "type": "string", "maxLength": 200 }, "item": { "enum": values } },
        "required": ["say", "item"],
    });
    for round in 0..2 {
        app.world_mut().resource_mut::<Arrivals>().0.clear();
        let npcs: Vec<Entity> = (0..8)
            .map(|i| app.world_mut().spawn(npc_request(i + round)).id())
            .collect();
        // Let them stream a while, then the large constraint arrives.
        update_until(&mut app, &npcs, |s| {
            s.stats.generated_tokens >= 1 || s.text.len() > 16
        });
        let warm = Instant::now();
        while warm.elapsed() < Duration::from_millis(500) {
            app.update();
            std::thread::sleep(Duration::from_micros(500));
        }
        let submitted = Instant::now();
        let big = app
            .world_mut()
            .spawn(
                LlmRequest::raw("Name one item:")
                    .with_json_schema(&schema)
                    .with_max_tokens(24)
                    .with_priority(RequestPriority::High),
            )
            .id();
        update_until(&mut app, &[big], |s| s.state != RequestState::Queued);
        let started = Instant::now();
        update_until(&mut app, &npcs, LlmRequestStatus::is_finished);
        update_until(&mut app, &[big], LlmRequestStatus::is_finished);
        let arrivals = std::mem::take(&mut app.world_mut().resource_mut::<Arrivals>().0);
        let mut gaps = Vec::new();
        let mut stall: f64 = 0.0;
        for npc in &npcs {
            let times: Vec<Instant> = arrivals
                .iter()
                .filter(|(e, _)| e == npc)
                .map(|(_, t)| *t)
                .collect();
            for w in times.windows(2) {
                let gap = w[1].duration_since(w[0]).as_secs_f64() * 1e3;
                gaps.push(gap);
                if w[1] > submitted && w[0] < started {
                    stall = stall.max(gap);
                }
            }
        }
        let median = percentile(&mut gaps, 0.5);
        let compile_ms = started.duration_since(submitted).as_secs_f64() * 1e3;
        f.add(
            "compile",
            &format!("round {round}: 5,000-value enum, submit to start"),
            compile_ms,
            "ms",
        );
        f.add(
            "compile",
            &format!("round {round}: NPCs' median token gap"),
            median,
            "ms",
        );
        f.add(
            "compile",
            &format!("round {round}: NPCs' longest gap while it compiles"),
            stall,
            "ms",
        );
        f.add(
            "compile",
            &format!("round {round}: longest gap while compiling / median gap (target <= 2)"),
            stall / median.max(1e-6),
            "x",
        );
        for e in npcs.into_iter().chain([big]) {
            app.world_mut().despawn(e);
        }
    }
}

/// Whether the same seed gives the same text on this machine's backend:
/// one request twice, then eight together twice (same batch each time).
fn seed(args: &Args, f: &mut Figures) {
    let mut s = base_settings(args);
    s.prefix_cache = false;
    s.context_per_sequence = 512;
    s.max_parallel_sequences = 8;
    s.sampling.ignore_eos = false;
    let mut app = ready_app(s);
    // The texts of NPCs 0..n, 48 tokens at most, each request as `tweak` makes it.
    let texts = |app: &mut App, n: usize, tweak: &dyn Fn(usize, LlmRequest) -> LlmRequest| {
        let reqs = (0..n)
            .map(|i| tweak(i, npc_request(i).with_max_tokens(48)))
            .collect();
        run(app, reqs)
            .0
            .into_iter()
            .map(|s| s.text)
            .collect::<Vec<String>>()
    };
    let seeded = |i: usize, r: LlmRequest| r.with_seed(1000 + i as u32);
    let one = texts(&mut app, 1, &seeded) == texts(&mut app, 1, &seeded);
    let a = texts(&mut app, 8, &seeded);
    let b = texts(&mut app, 8, &seeded);
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    // Greedy texts as a checksum: two builds or settings that must compute
    // the same thing (e.g. a ggml patch on and off) give the same figures.
    let greedy = |app: &mut App, n: usize| {
        let t = texts(app, n, &|_, r: LlmRequest| r.with_temperature(0.0));
        f64::from(fnv1a32(t.join("\u{1}").as_bytes()))
    };
    let (greedy_one, greedy_eight) = (greedy(&mut app, 1), greedy(&mut app, 8));
    f.add(
        "seed",
        "same seed, same text: one request twice (1 = held)",
        f64::from(u8::from(one)),
        "",
    );
    f.add(
        "seed",
        "same seed, same text: 8 batched requests twice, identical",
        same as f64,
        "of 8",
    );
    f.add(
        "seed",
        "greedy text checksum (FNV-1a), one request",
        greedy_one,
        "",
    );
    f.add(
        "seed",
        "greedy texts checksum (FNV-1a), 8 batched requests",
        greedy_eight,
        "",
    );
}

/// FNV-1a, 32 bits: a checksum of texts that fits a JSON number exactly.
fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |h: u32, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Generated tokens per second of wall time over a set of requests.
fn aggregate(done: &[LlmRequestStatus], wall: Duration) -> f64 {
    done.iter().map(|s| s.stats.generated_tokens).sum::<usize>() as f64 / wall.as_secs_f64()
}

/// The same N-NPC load through the remote backend and the local engine.
fn remote(args: &Args, f: &mut Figures) {
    let url = args
        .remote
        .clone()
        .expect("the remote section needs --remote URL");
    for &n in &args.npcs {
        let mut s = base_settings(args);
        s.prefix_cache = false;
        s.context_per_sequence = 512;
        s.max_parallel_sequences = n as u32;
        s.queue_capacity = n as u32;
        // A tag unique to this run: the server's prompt cache must not
        // remember the prompts from an earlier run (the local side has its
        // prefix cache off).
        let tag = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let reqs = || {
            (0..n)
                .map(|i| {
                    let mut r = npc_request(i);
                    if let bevy_npc_llm::request::LlmPrompt::Chat(m) = &mut r.prompt {
                        m[0].content = format!("[{tag}] {}", m[0].content);
                    }
                    r
                })
                .collect::<Vec<_>>()
        };
        let mut local = ready_app(s.clone());
        let (ls, lw) = run(&mut local, reqs());
        drop(local);
        s.backend = BackendChoice::Remote;
        s.remote = RemoteSettings::new(url.clone());
        let mut remote = ready_app(s);
        let (rs, rw) = run(&mut remote, reqs());
        let l = aggregate(&ls, lw);
        let r = aggregate(&rs, rw);
        f.add("remote", &format!("N={n:<2} local aggregate"), l, "tok/s");
        f.add("remote", &format!("N={n:<2} remote aggregate"), r, "tok/s");
        f.add("remote", &format!("N={n:<2} remote / local"), r / l, "x");
        let ttft = |v: &[LlmRequestStatus]| {
            let t: Vec<f64> = v
                .iter()
                .filter_map(|s| s.stats.time_to_first_token)
                .map(|d| d.as_secs_f64() * 1e3)
                .collect();
            t.iter().sum::<f64>() / t.len().max(1) as f64
        };
        f.add(
            "remote",
            &format!("N={n:<2} local mean time to first token"),
            ttft(&ls),
            "ms",
        );
        f.add(
            "remote",
            &format!("N={n:<2} remote mean time to first token"),
            ttft(&rs),
            "ms",
        );
    }
}

fn history(turns: usize) -> Vec<ChatMessage> {
    let mut m = vec![ChatMessage::system(
        "You are Brom, the blacksmith of Oakvale. You are gruff but kind, proud of your anvil, \
         suspicious of wizards, and fond of the baker Mira. You speak in short, plain sentences \
         and never use modern words. You remember every customer and what they ordered.",
    )];
    for i in 0..turns {
        m.push(ChatMessage::user(format!(
            "Customer {i} says: good day Brom, I need horseshoes for my grey mare and a new \
             hinge for the barn door, number {i}."
        )));
        m.push(ChatMessage::assistant(format!(
            "Horseshoes and hinge number {i}, then. Come back at sundown and bring coin."
        )));
    }
    m
}

/// What [`ttft_second_turn`] measured.
struct SecondTurns {
    /// The median second turn's time to first token, ms.
    median: f64,
    /// Every second turn's, in the order they ran, ms.
    each: Vec<f64>,
    /// One more second turn after the engine sat idle for
    /// [`IDLE_BEFORE_TURN`] (a player reading the answer), ms; cache on
    /// only.
    after_idle: Option<f64>,
    /// The last second turn's prompt and reused prefix, tokens.
    prompt: usize,
    reused: usize,
    /// The median turn's admission, llama_decode call, device wait and
    /// token choice, ms.
    parts: [f64; 4],
    /// Lone prompt steps rounded up to a width over all turns.
    rounded_steps: u64,
}

/// How long the engine idles before [`SecondTurns::after_idle`]: longer
/// than llama.cpp keeps a recorded CUDA graph unused (10 s), as a player
/// who reads an answer before replying does.
const IDLE_BEFORE_TURN: Duration = Duration::from_secs(12);

/// The second turn's time to first token (median of `--reps`, at least 3,
/// back to back; with the cache on, one more after the engine idled), its prompt and
/// reused prefix, and where the median turn's time went: admission, the
/// llama_decode call, the device wait and the token choice of its one step
/// (the second turn asks for one token, so its counters are that step's),
/// in ms.
fn ttft_second_turn(args: &Args, cache: bool) -> SecondTurns {
    let mut s = base_settings(args);
    s.prefix_cache = cache;
    s.sampling.max_tokens = 8;
    let mut app = ready_app(s);
    let npc = app.world_mut().spawn_empty().id();
    let mut msgs = history(8);
    msgs.push(ChatMessage::user("Hello again, Brom."));
    let mut times = Vec::new();
    let mut last = (0, 0);
    let reps = args.reps.max(3);
    let mut after_idle = None;
    let rounded0 = app
        .world()
        .resource::<LlmEngineStats>()
        .counters
        .rounded_prompt_steps;
    for rep in 0..=reps {
        if rep == reps && !cache {
            break;
        }
        // Turn 1 (warms this NPC's cache), then turn 2 extends it by one line.
        let _ = run(
            &mut app,
            vec![LlmRequest::chat(msgs.clone()).with_cache_key(npc)],
        );
        let mut second = msgs.clone();
        second.push(ChatMessage::assistant("Good day."));
        if rep == reps {
            // The last turn comes after the engine sat idle (frames run on).
            let idle = Instant::now();
            while idle.elapsed() < IDLE_BEFORE_TURN {
                app.update();
                std::thread::sleep(Duration::from_millis(16));
            }
        }
        // Each second turn a word longer than the one before, so no two have
        // one shape: a game's next turn is a shape the GPU has not just run
        // (llama.cpp replays a recorded CUDA graph only for a shape it ran
        // twice in a row, which would flatter repeated identical turns).
        second.push(ChatMessage::user(format!(
            "Is my order{} ready?",
            " really".repeat(rep)
        )));
        let c0 = app.world().resource::<LlmEngineStats>().counters.clone();
        let (st, _) = run(
            &mut app,
            vec![
                LlmRequest::chat(second)
                    .with_cache_key(npc)
                    .with_max_tokens(1),
            ],
        );
        // The engine's counters come as an event of their own: wait for the
        // ones that hold this request (its one step included).
        let c1 = settled_counters(&mut app, &c0, 1);
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let ttft = ms(st[0].stats.time_to_first_token.unwrap());
        let parts = [
            ms(c1.admit_time - c0.admit_time),
            ms(c1.decode_time - c0.decode_time),
            ms(c1.sync_time - c0.sync_time),
            ms(c1.pick_time - c0.pick_time),
        ];
        if rep == reps {
            after_idle = Some(ttft);
        } else {
            times.push((ttft, parts));
            last = (st[0].stats.prompt_tokens, st[0].stats.reused_prefix_tokens);
        }
    }
    let each = times.iter().map(|t| t.0).collect();
    let rounded_steps = app
        .world()
        .resource::<LlmEngineStats>()
        .counters
        .rounded_prompt_steps
        - rounded0;
    times.sort_by(|a, b| a.0.total_cmp(&b.0));
    SecondTurns {
        median: times[reps / 2].0,
        each,
        after_idle,
        prompt: last.0,
        reused: last.1,
        parts: times[reps / 2].1,
        rounded_steps,
    }
}

/// NPCs starting lines while others talk, as in a town: `--arrivals N`
/// (16) requests run at a time, each one that finishes is replaced at once by a
/// new one (different prompt, 32–79 tokens), 6 N in all, so
/// prompt steps keep landing between generation steps. Bounded in frames.
fn arrivals(args: &Args, f: &mut Figures) {
    let (at_once, total) = (args.arrivals, args.arrivals * 6);
    let mut s = base_settings(args);
    s.max_parallel_sequences = at_once as u32;
    let mut app = ready_app(s);
    let request = |i: usize| npc_request(i).with_max_tokens(32 + (i as u32 * 7) % 48);
    let c0 = app.world().resource::<LlmEngineStats>().counters.clone();
    let start = Instant::now();
    let mut live: Vec<Option<Entity>> = (0..at_once)
        .map(|i| Some(app.world_mut().spawn(request(i)).id()))
        .collect();
    let (mut started, mut done, mut tokens) = (at_once, 0, 0);
    let mut rates = Vec::new();
    for _ in 0..2_000_000 {
        if done == total {
            break;
        }
        app.update();
        for slot in &mut live {
            let Some(e) = *slot else { continue };
            let status = app.world().get::<LlmRequestStatus>(e).unwrap();
            if !status.is_finished() {
                continue;
            }
            let st = status.clone();
            if let RequestState::Failed(err) = &st.state {
                panic!("request failed: {err}");
            }
            tokens += st.stats.generated_tokens;
            rates.push(f64::from(st.stats.tokens_per_second));
            app.world_mut().despawn(e);
            done += 1;
            *slot = (started < total).then(|| {
                started += 1;
                app.world_mut().spawn(request(started - 1)).id()
            });
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!(done, total, "arrivals did not finish in the frame bound");
    let wall = start.elapsed().as_secs_f64();
    let c1 = settled_counters(&mut app, &c0, total as u64);
    let name = |what: &str| format!("{at_once} at a time, {total} lines: {what}");
    f.add(
        "arrivals",
        &name("aggregate"),
        tokens as f64 / wall,
        "tok/s",
    );
    f.add(
        "arrivals",
        &name("per-NPC generation rate (median)"),
        percentile(&mut rates, 0.5),
        "tok/s",
    );
    let steps = (c1.decode_calls - c0.decode_calls).max(1) as f64;
    let ms = |d: Duration| d.as_secs_f64() * 1e3 / steps;
    f.add(
        "arrivals",
        &name("per step: llama_decode call"),
        ms(c1.decode_time - c0.decode_time),
        "ms",
    );
    f.add(
        "arrivals",
        &name("per step: device wait"),
        ms(c1.sync_time - c0.sync_time),
        "ms",
    );
    f.add(
        "arrivals",
        &name("per step: gap fillers"),
        (c1.gap_fillers - c0.gap_fillers) as f64 / steps,
        "tokens",
    );
    f.add(
        "arrivals",
        &name("per step: prompt padding"),
        (c1.prompt_padding - c0.prompt_padding) as f64 / steps,
        "tokens",
    );
}

/// The engine's counters once they hold `completed` more requests than
/// `c0` (they come as an event of their own; bounded in frames).
fn settled_counters(app: &mut App, c0: &EngineCounters, completed: u64) -> EngineCounters {
    for _ in 0..500 {
        let c = &app.world().resource::<LlmEngineStats>().counters;
        if c.completed >= c0.completed + completed {
            break;
        }
        app.update();
        std::thread::sleep(Duration::from_millis(1));
    }
    app.world().resource::<LlmEngineStats>().counters.clone()
}

fn cache(args: &Args, f: &mut Figures) {
    let on = ttft_second_turn(args, true);
    let off = ttft_second_turn(args, false);
    let (cached, plain, prompt, reused) = (on.median, off.median, on.prompt, on.reused);
    for (what, turns) in [("cache on", &on), ("cache off", &off)] {
        for (i, &v) in turns.each.iter().enumerate() {
            f.add(
                "cache",
                &format!("second turn {}, {what}: TTFT", i + 1),
                v,
                "ms",
            );
        }
        if let Some(v) = turns.after_idle {
            f.add(
                "cache",
                &format!(
                    "second turn after {} s idle, {what}: TTFT",
                    IDLE_BEFORE_TURN.as_secs()
                ),
                v,
                "ms",
            );
        }
        f.add(
            "cache",
            &format!("{what}: lone prompt steps rounded up"),
            turns.rounded_steps as f64,
            "steps",
        );
        let parts = turns.parts;
        for (part, v) in [
            "admission (render, tokenize, slot)",
            "llama_decode call",
            "device wait",
            "token choice",
        ]
        .iter()
        .zip(parts)
        {
            f.add("cache", &format!("second turn, {what}: {part}"), v, "ms");
        }
    }
    f.add(
        "cache",
        "second-turn prompt length",
        prompt as f64,
        "tokens",
    );
    f.add(
        "cache",
        "reused prefix tokens (cache on)",
        reused as f64,
        "tokens",
    );
    f.add(
        "cache",
        "second-turn time to first token, cache on",
        cached,
        "ms",
    );
    f.add(
        "cache",
        "second-turn time to first token, cache off",
        plain,
        "ms",
    );
    f.add(
        "cache",
        "ratio cached / uncached (target <= 0.3)",
        cached / plain,
        "x",
    );
}

#[derive(Resource, Default)]
struct PluginTimer {
    start: Option<Instant>,
    last: Duration,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// The two timer systems around the plugin's sets (before `Control`,
/// after `Receive`), in `app`.
fn add_plugin_timer(app: &mut App) {
    app.init_resource::<PluginTimer>();
    app.add_systems(
        PreUpdate,
        (
            (|mut t: ResMut<PluginTimer>| t.start = Some(Instant::now()))
                .before(NpcLlmSystems::Control),
            (|mut t: ResMut<PluginTimer>| {
                if let Some(s) = t.start.take() {
                    t.last = s.elapsed();
                }
            })
            .after(NpcLlmSystems::Receive),
        ),
    );
}

fn frames(args: &Args, f: &mut Figures) {
    // The floor: the same two timers in an app without the plugin (the
    // executor's hand-off from one to the other, nothing between them).
    let mut bare = App::new();
    bare.add_plugins(MinimalPlugins);
    add_plugin_timer(&mut bare);
    let (mut floor, mut bare_frames) = (Vec::with_capacity(3000), Vec::with_capacity(3000));
    for _ in 0..3000 {
        let t = Instant::now();
        bare.update();
        bare_frames.push(t.elapsed().as_secs_f64() * 1e3);
        floor.push(bare.world().resource::<PluginTimer>().last.as_secs_f64() * 1e3);
    }
    drop(bare);
    let mut s = base_settings(args);
    s.sampling.max_tokens = args.tokens.max(128);
    let mut app = ready_app(s);
    add_plugin_timer(&mut app);
    let measure = |app: &mut App, frames: usize, until_done: Option<&[Entity]>| {
        let (mut ft, mut pt) = (Vec::new(), Vec::new());
        for _ in 0..frames {
            let t = Instant::now();
            app.update();
            ft.push(t.elapsed().as_secs_f64() * 1e3);
            pt.push(app.world().resource::<PluginTimer>().last.as_secs_f64() * 1e3);
            if let Some(es) = until_done
                && all_status(app.world(), es, LlmRequestStatus::is_finished)
            {
                break;
            }
        }
        (ft, pt)
    };
    let (mut idle, mut idle_p) = measure(&mut app, 3000, None);
    let es: Vec<Entity> = (0..8)
        .map(|i| app.world_mut().spawn(npc_request(i)).id())
        .collect();
    let (mut busy, mut busy_p) = measure(&mut app, 1_000_000, Some(&es));
    for (name, v) in [("idle", &mut idle), ("8 NPCs talking", &mut busy)] {
        f.add(
            "frames",
            &format!("{name}: frames"),
            v.len() as f64,
            "frames",
        );
        f.add(
            "frames",
            &format!("{name}: frame time p50"),
            percentile(v, 0.5),
            "ms",
        );
        f.add(
            "frames",
            &format!("{name}: frame time p99"),
            percentile(v, 0.99),
            "ms",
        );
        f.add(
            "frames",
            &format!("{name}: frame time max"),
            percentile(v, 1.0),
            "ms",
        );
    }
    f.add(
        "frames",
        "idle, no plugin: frame time p99",
        percentile(&mut bare_frames, 0.99),
        "ms",
    );
    f.add(
        "frames",
        "idle, no plugin (the timers alone): p99",
        percentile(&mut floor, 0.99),
        "ms",
    );
    f.add(
        "frames",
        "idle: plugin systems p50",
        percentile(&mut idle_p, 0.5),
        "ms",
    );
    f.add(
        "frames",
        "idle: plugin systems p99 (target <= 0.1)",
        percentile(&mut idle_p, 0.99),
        "ms",
    );
    f.add(
        "frames",
        "8 NPCs talking: plugin systems p99 (target <= 0.1)",
        percentile(&mut busy_p, 0.99),
        "ms",
    );
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn memory(args: &Args, f: &mut Figures) {
    let mut s = base_settings(args);
    s.max_parallel_sequences = 1;
    let mut one = ready_app(s.clone());
    let _ = run(&mut one, vec![npc_request(0)]);
    let rss1 = rss_mb();
    let (kv_token, ctx) = {
        let p = one
            .world()
            .resource::<BackendStatus>()
            .plan
            .clone()
            .unwrap();
        let reg = one.world().resource::<ModelRegistry>();
        (
            reg.get(&p.model).unwrap().kv_bytes_per_token,
            p.engine.context_per_sequence,
        )
    };
    drop(one);
    s.max_parallel_sequences = 8;
    let mut eight = ready_app(s);
    let _ = run(&mut eight, (0..8).map(npc_request).collect());
    let rss8 = rss_mb();
    let kv_extra = (7 * u64::from(ctx) * kv_token) as f64 / (1024.0 * 1024.0);
    f.add("memory", "RSS serving 1 NPC (1 sequence)", rss1, "MB");
    f.add("memory", "RSS serving 8 NPCs (8 sequences)", rss8, "MB");
    f.add(
        "memory",
        "KV cache of the 7 extra sequences",
        kv_extra,
        "MB",
    );
    f.add(
        "memory",
        "excess over 1 NPC + extra KV (target <= 50)",
        rss8 - rss1 - kv_extra,
        "MB",
    );
}

fn player(args: &Args, f: &mut Figures) {
    let mut s = base_settings(args);
    s.sampling.max_tokens = 256;
    let mut app = ready_app(s);
    let player_req = |i: usize| {
        let mut m = history(3);
        m.push(ChatMessage::user(format!(
            "Player asks question {i}: where is the mill?"
        )));
        LlmRequest::chat(m)
            .with_priority(RequestPriority::High)
            .with_max_tokens(4)
    };
    let (st, _) = run(&mut app, vec![player_req(0)]);
    let idle = st[0].stats.time_to_first_token.unwrap().as_secs_f64() * 1e3;
    let bg: Vec<Entity> = (0..8)
        .map(|i| app.world_mut().spawn(npc_request(i)).id())
        .collect();
    // Wait until all eight generate.
    update_until(&mut app, &bg, |s| {
        s.stats.generated_tokens > 0 || !s.text.is_empty()
    });
    let bg_start = Instant::now();
    let (st, _) = run(&mut app, vec![player_req(1)]);
    let busy = st[0].stats.time_to_first_token.unwrap().as_secs_f64() * 1e3;
    // The villagers keep going: every one must finish (before the scheduler
    // they stalled for good once a player request arrived mid-line).
    update_until(&mut app, &bg, LlmRequestStatus::is_finished);
    let bg_wall = bg_start.elapsed().as_secs_f64();
    let statuses: Vec<LlmRequestStatus> = bg
        .iter()
        .map(|e| app.world().get::<LlmRequestStatus>(*e).unwrap().clone())
        .collect();
    let completed = statuses
        .iter()
        .filter(|s| matches!(s.state, RequestState::Completed(_)))
        .count();
    let tokens: usize = statuses.iter().map(|s| s.stats.generated_tokens).sum();
    for e in bg {
        app.world_mut().despawn(e);
    }
    f.add(
        "player",
        "high-priority time to first token, idle engine",
        idle,
        "ms",
    );
    f.add("player", "same, while 8 NPCs generate", busy, "ms");
    f.add(
        "player",
        "ratio busy / idle (target <= 1.5)",
        busy / idle,
        "x",
    );
    f.add(
        "player",
        "background NPCs completed after the player's request (target >= 8)",
        completed as f64,
        "",
    );
    f.add(
        "player",
        "background aggregate from the player's request to the last NPC",
        tokens as f64 / bg_wall.max(1e-9),
        "tok/s",
    );
}

fn main() {
    let args = parse_args();
    let mut figs = Figures {
        rows: Vec::new(),
        json: args.json,
    };
    println!(
        "bevy_npc_llm bench: tokens={} npcs={:?}{}",
        args.tokens,
        args.npcs,
        args.label
            .as_deref()
            .map(|l| format!(" [{l}]"))
            .unwrap_or_default()
    );
    let plan_json;
    {
        let app = ready_app(base_settings(&args));
        let p = app
            .world()
            .resource::<bevy_npc_llm::hardware::HardwareProfile>();
        let plan = app
            .world()
            .resource::<BackendStatus>()
            .plan
            .clone()
            .unwrap();
        println!(
            "machine: {} ({} physical / {} logical cores, {}), GPUs: {}",
            p.cpu_brand,
            p.physical_cores,
            p.logical_cores,
            p.simd.join(" "),
            p.gpus
                .iter()
                .map(|g| format!("{} {}", g.backend, g.description))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "plan: model {} on {} ({} GPU layers, {} threads, device top-k {}, sampling threads {}, unified KV {}, gap fillers {}, even prompt steps {}, rounded prompt steps {}, flash attention {}, lanes {})",
            plan.model,
            plan.device.as_deref().unwrap_or(&plan.backend),
            plan.engine.gpu_layers,
            plan.engine.threads,
            plan.engine.device_sampling,
            plan.engine.sampling_threads,
            plan.engine.kv_unified,
            plan.engine.shaping.fill_gaps,
            plan.engine.shaping.even_prompt_steps,
            plan.engine.shaping.round_prompt_steps,
            plan.engine
                .flash_attention
                .map_or("llama.cpp's choice", |on| if on { "on" } else { "off" }),
            plan.engine.lanes,
        );
        plan_json = serde_json::json!({
            "backend": plan.backend,
            "device": plan.device,
            "gpu_layers": plan.engine.gpu_layers,
            "threads": plan.engine.threads,
            "device_sampling": plan.engine.device_sampling,
            "sampling_threads": plan.engine.sampling_threads,
            "kv_unified": plan.engine.kv_unified,
            "fill_gaps": plan.engine.shaping.fill_gaps,
            "even_prompt_steps": plan.engine.shaping.even_prompt_steps,
            "round_prompt_steps": plan.engine.shaping.round_prompt_steps,
            "flash_attention": plan.engine.flash_attention,
            "lanes": plan.engine.lanes,
            "model": plan.model,
            "machine": format!("{} ({} physical cores)", p.cpu_brand, p.physical_cores),
        });
    }
    let t0 = Instant::now();
    for section in args.sections.clone() {
        let t = Instant::now();
        match section.as_str() {
            "binding" => binding(&args, &mut figs),
            "npcs" => npcs(&args, &mut figs),
            "cache" => cache(&args, &mut figs),
            "frames" => frames(&args, &mut figs),
            "memory" => memory(&args, &mut figs),
            "player" => player(&args, &mut figs),
            "remote" => remote(&args, &mut figs),
            "constrained" => constrained(&args, &mut figs),
            "compile" => compile_stall(&args, &mut figs),
            "seed" => seed(&args, &mut figs),
            "arrivals" => arrivals(&args, &mut figs),
            "kv_restore" => kv_restore::kv_restore(&args, &mut figs),
            other => panic!("unknown section {other}"),
        }
        println!("  ({section}: {:.1} s)", t.elapsed().as_secs_f64());
    }
    println!(
        "bench done in {:.1} s, {} figures",
        t0.elapsed().as_secs_f64(),
        figs.rows.len()
    );
    if let Some(path) = &args.json_out {
        let mut doc = figures_json(&figs.rows);
        doc["label"] = serde_json::json!(args.label);
        doc["plan"] = plan_json;
        doc["comparators"] = args.comparators.clone().unwrap_or(serde_json::Value::Null);
        doc["args"] = serde_json::json!({ "tokens": args.tokens, "npcs": args.npcs });
        std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap())
            .expect("write --json-out");
        println!("figures and targets written to {path}");
    }
}

/// A figure's target from its name, `(target <= x)` or `(target >= x)`.
fn target(name: &str) -> Option<(&'static str, f64)> {
    let t = name.split("(target ").nth(1)?;
    let (op, rest) = if let Some(r) = t.strip_prefix("<= ") {
        ("<=", r)
    } else {
        (">=", t.strip_prefix(">= ")?)
    };
    Some((op, rest.trim_end_matches(')').trim().parse().ok()?))
}

/// Every figure with its target and whether it was met, as JSON.
fn figures_json(rows: &[(String, String, f64, String)]) -> serde_json::Value {
    let figures: Vec<serde_json::Value> = rows
        .iter()
        .map(|(section, name, value, unit)| {
            let t = target(name);
            let met = t.map(|(op, x)| if op == "<=" { *value <= x } else { *value >= x });
            serde_json::json!({
                "section": section,
                "name": name,
                "value": if value.is_finite() { serde_json::json!(value) } else { serde_json::Value::Null },
                "unit": unit,
                "target": t.map(|(op, x)| serde_json::json!({ "op": op, "value": x })),
                "met": met,
            })
        })
        .collect();
    serde_json::json!({ "figures": figures })
}
