//! Faults and load with the real model: a crashing worker, a flood of
//! requests, bad model files, and exiting mid-generation. Nothing may hang
//! or panic the game.

mod common;

use std::time::{Duration, Instant};

use bevy::prelude::*;
use bevy_npc_llm::errors::{LlmError, ModelLoadError};
use bevy_npc_llm::prelude::*;
use bevy_npc_llm::registry::ModelRegistry;
use common::*;

#[test]
fn worker_crash_fails_in_flight_requests_and_a_new_load_restarts_it() {
    let mut s = settings();
    s.sampling.max_tokens = 200;
    let mut app = app_with(s);
    let running = start_streaming(&mut app, 3, "Tell a long story", true);
    bevy_npc_llm::testing::crash_worker(app.world_mut());
    run_until_finished(&mut app, &running);
    let r = app.world().resource::<Recorded>();
    for e in &running {
        assert!(
            matches!(r.failure(*e), Some(LlmError::WorkerGone(_))),
            "{:?}",
            r.of(*e)
        );
    }
    assert!(matches!(
        app.world().resource::<LlmModelState>(),
        LlmModelState::Failed {
            error: ModelLoadError::WorkerGone,
            ..
        }
    ));
    let stats = app.world().resource::<LlmEngineStats>();
    assert!(
        stats
            .worker_failure
            .as_deref()
            .is_some_and(|m| m.contains("crash"))
    );
    assert_eq!(stats.in_flight, 0);
    // A request now fails at once with a typed error instead of hanging.
    let e = request(&mut app, chat("Anyone?"));
    run_until_finished(&mut app, &[e]);
    assert!(matches!(
        app.world().resource::<Recorded>().failure(e),
        Some(LlmError::ModelUnavailable(_))
    ));
    // Restart on request.
    load_ready(&mut app, None);
    complete(&mut app, chat("Back?").with_max_tokens(8));
}

#[test]
fn five_hundred_requests_in_one_frame_reject_exactly_the_overflow() {
    let mut s = settings();
    s.queue_capacity = 64;
    s.max_parallel_sequences = 8;
    s.context_per_sequence = 256;
    s.sampling.max_tokens = 2;
    let mut app = app_with(s.clone());
    load_ready(&mut app, None);
    let es: Vec<Entity> = (0..500)
        .map(|i| {
            app.world_mut()
                .spawn(LlmRequest::raw(format!("Villager {i} says")))
                .id()
        })
        .collect();
    run_until_finished(&mut app, &es);
    let (done, full) = app
        .world()
        .resource::<Recorded>()
        .completed_and_queue_full(&es);
    let capacity = s.capacity();
    assert_eq!(capacity, 72);
    assert_eq!((done, full), (capacity, 500 - capacity));
    assert_eq!(app.world().resource::<LlmEngineStats>().in_flight, 0);
    // Every slot is free again: the counters show nothing active.
    run_until(&mut app, 10, |app| {
        let c = &app.world().resource::<LlmEngineStats>().counters;
        c.active_sequences == 0 && c.queued == 0
    });
}

#[test]
fn cancel_and_despawn_storm_leaves_nothing_behind() {
    let mut s = settings();
    s.sampling.max_tokens = 64;
    let mut app = app_with(s);
    let mut alive: Vec<Entity> = Vec::new();
    let mut rng = 12345u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for round in 0..120 {
        if round < 80 {
            alive.push(request(&mut app, chat(&format!("Line {round}"))));
        }
        if !alive.is_empty() && next() % 3 == 0 {
            let e = alive.swap_remove((next() as usize) % alive.len());
            match next() % 3 {
                0 => {
                    app.world_mut().despawn(e);
                }
                1 => {
                    app.world_mut().entity_mut(e).remove::<LlmRequest>();
                }
                _ => {
                    app.world_mut()
                        .write_message(CancelLlmRequest { entity: e });
                }
            }
        }
        app.update();
    }
    run_until(&mut app, 240, |app| {
        app.world().resource::<LlmEngineStats>().in_flight == 0
    });
    complete(&mut app, chat("Still fine?").with_max_tokens(8));
}

#[test]
fn broken_gguf_files_fail_typed_and_the_previous_model_keeps_serving() {
    let dir = std::env::temp_dir().join(format!("npc-llm-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let smol = std::fs::read(smol_file()).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", smol[..smol.len() / 3].to_vec()),
        (
            "random",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ),
        ("empty", Vec::new()),
    ];
    let mut s = settings();
    s.verify_sha256 = false; // exercise llama.cpp's own checks
    let mut app = app_with(s);
    load_ready(&mut app, None);
    for (name, bytes) in &cases {
        let path = dir.join(format!("{name}.gguf"));
        std::fs::write(&path, bytes).unwrap();
        {
            let mut reg = app.world_mut().resource_mut::<ModelRegistry>();
            let mut e = reg.get(SMOL).unwrap().clone();
            e.id = (*name).into();
            e.file = path.clone();
            reg.add(e).unwrap();
        }
        match load_failure(&mut app, Some(name)) {
            ModelLoadError::Llama { .. } => {}
            other => panic!("{name}: {other:?}"),
        }
        assert_eq!(
            app.world()
                .resource::<LlmEngineStats>()
                .serving_model
                .as_deref(),
            Some(SMOL),
            "{name}"
        );
        let e = request(&mut app, chat("Still serving?").with_max_tokens(4));
        run_until_finished(&mut app, &[e]);
        assert!(
            app.world()
                .resource::<Recorded>()
                .completed_text(e)
                .is_some(),
            "{name}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn exiting_mid_generation_joins_the_worker_quickly() {
    let mut s = settings();
    s.sampling.max_tokens = 500;
    let mut app = app_with(s);
    let _streaming = start_streaming(&mut app, 4, "Talk forever, part", false);
    let t = Instant::now();
    drop(app); // the worker's Drop guard stops and joins the thread
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

/// Exit never waits for a model load to finish: with a load asked for every
/// frame (each stops the one before it), the last is still under way when
/// the app exits, and the exit stops it instead of finishing it or starting
/// a queued one. Checked by what the worker did on its way out, not by a
/// wall time on a shared machine: llama.cpp reads a GGUF's header and
/// vocabulary before it can be interrupted, which is most of this small
/// model's load. (A shutdown that a starting load once overwrote made the
/// exit finish that load.)
#[test]
fn a_load_requested_every_frame_still_loads_and_exit_stops_the_last() {
    let mut app = app();
    let start = Instant::now();
    run_until(&mut app, 60, |app| {
        app.world_mut().write_message(LoadModel::default());
        app.world().resource::<LlmModelState>().is_ready()
    });
    assert!(start.elapsed() < Duration::from_secs(60));
    for _ in 0..50 {
        app.world_mut().write_message(LoadModel {
            model: Some(GEMMA.into()),
        });
        app.update();
    }
    assert!(
        matches!(
            app.world().resource::<LlmModelState>(),
            LlmModelState::Loading { model, .. } if model == GEMMA
        ),
        "the last load must still be under way at exit: {:?}",
        app.world().resource::<LlmModelState>()
    );
    let exit = bevy_npc_llm::testing::exit_worker(app.world_mut());
    assert!(exit.loaded.is_empty(), "{exit:?}");
    assert_eq!(exit.aborted, [GEMMA], "{exit:?}");
}

#[test]
fn a_gguf_of_the_wrong_architecture_for_its_entry_is_refused() {
    let mut app = app();
    load_ready(&mut app, None);
    {
        let mut reg = app.world_mut().resource_mut::<ModelRegistry>();
        // Gemma's file (its size and sha256, so verification passes) under an
        // entry that says it is a llama model.
        let mut e = reg.get(GEMMA).unwrap().clone();
        e.id = "mislabelled".into();
        e.architecture = Some("llama".into());
        reg.add(e).unwrap();
    }
    match load_failure(&mut app, Some("mislabelled")) {
        ModelLoadError::WrongArchitecture {
            expected, found, ..
        } => assert_eq!((expected.as_str(), found.as_str()), ("llama", "gemma3")),
        other => panic!("{other:?}"),
    }
    complete(&mut app, chat("Still serving?").with_max_tokens(4));
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// A model file without read permission fails with a typed `VerifyError::Io`
/// naming the file, and a request gets `ModelUnavailable`. Root reads any
/// file, so as root the test runs itself again as `nobody` (util-linux
/// `setpriv`) from a world-readable copy of this test binary and of the
/// model registry (the checkout itself may sit where `nobody` cannot read,
/// e.g. under a mode-700 `/root`).
#[test]
fn unreadable_model_file_fails_typed() {
    use bevy_npc_llm::errors::VerifyError;
    const CHILD: &str = "BEVY_NPC_LLM_UNREADABLE_CHILD";
    const REGISTRY: &str = "BEVY_NPC_LLM_UNREADABLE_REGISTRY";
    if std::env::var_os(CHILD).is_none() && running_as_root() {
        let dir =
            std::env::temp_dir().join(format!("npc-llm-unreadable-exe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("reliability-test");
        std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
        let registry = dir.join("models.ron");
        std::fs::copy(models_dir().join("models.ron"), &registry).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&registry, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&exe)
            .args([
                "--exact",
                "unreadable_model_file_fails_typed",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .env(REGISTRY, &registry)
            .current_dir(&dir)
            .output()
            .expect("setpriv (util-linux) runs the test as nobody");
        let _ = std::fs::remove_dir_all(&dir);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "as nobody: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("npc-llm-unreadable-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("locked.gguf");
    std::fs::write(&file, vec![7u8; 1 << 20]).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o000)).unwrap();
    assert!(
        std::fs::File::open(&file).is_err(),
        "this user can still read a mode-000 file"
    );
    let registry =
        std::env::var_os(REGISTRY).map_or_else(|| models_dir().join("models.ron"), Into::into);
    let mut app = app_with_registry(settings(), &registry);
    app.update(); // the registry file is read at startup
    {
        let mut reg = app.world_mut().resource_mut::<ModelRegistry>();
        let mut e = reg.get(SMOL).unwrap().clone();
        e.id = "locked".into();
        e.file = file.clone();
        e.size_bytes = 1 << 20; // the size check passes; reading does not
        reg.add(e).unwrap();
    }
    match load_failure(&mut app, Some("locked")) {
        ModelLoadError::Verify(VerifyError::Io { path, message }) => {
            assert_eq!(path, file);
            assert!(message.to_lowercase().contains("permission"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let e = request(&mut app, chat("Hello?"));
    run_until_finished(&mut app, &[e]);
    assert!(matches!(
        app.world().resource::<Recorded>().failure(e),
        Some(LlmError::ModelUnavailable(_))
    ));
    let _ = std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600));
    let _ = std::fs::remove_dir_all(dir);
}

/// A request that starts a load which then fails (here: the file is gone)
/// gets `ModelUnavailable` instead of waiting for a model forever.
#[test]
fn a_request_waiting_on_a_failing_load_fails_typed() {
    let mut s = settings();
    s.model = "gone".into();
    let mut app = app_with(s);
    app.update(); // the registry file is read at startup
    {
        let mut reg = app.world_mut().resource_mut::<ModelRegistry>();
        let mut e = reg.get(SMOL).unwrap().clone();
        e.id = "gone".into();
        e.file = std::env::temp_dir().join("npc-llm-no-such-model.gguf");
        reg.add(e).unwrap();
    }
    let es: Vec<Entity> = (0..3)
        .map(|i| request(&mut app, chat(&format!("Hello {i}?"))))
        .collect();
    run_until(&mut app, 30, |app| {
        let r = app.world().resource::<Recorded>();
        es.iter().all(|e| r.finished(*e))
    });
    let r = app.world().resource::<Recorded>();
    for e in &es {
        assert!(
            matches!(r.failure(*e), Some(LlmError::ModelUnavailable(_))),
            "{:?}",
            r.of(*e)
        );
    }
}

/// Models the game was told are unloaded (a test system's record).
#[derive(Resource, Default)]
struct UnloadedSeen(Vec<String>);

/// A game that unloads while a load is under way ends with no model and
/// says so: the state is `Unloaded` once the worker has unloaded what that
/// load brought in (not `Ready` with nothing loaded, where the next request
/// waited for a model forever), and the next request loads the settings'
/// model again and is answered.
#[test]
fn unloading_during_a_load_ends_unloaded_and_the_next_request_is_served() {
    use bevy_npc_llm::events::{ModelUnloaded, UnloadModel};
    let mut app = app();
    app.init_resource::<UnloadedSeen>().add_systems(
        Update,
        |mut seen: ResMut<UnloadedSeen>, mut msgs: MessageReader<ModelUnloaded>| {
            seen.0.extend(msgs.read().map(|m| m.model.clone()));
        },
    );
    load_ready(&mut app, None);
    app.world_mut().write_message(LoadModel {
        model: Some(GEMMA.into()),
    });
    app.update();
    app.world_mut().write_message(UnloadModel);
    run_until(&mut app, 60, |app| {
        app.world()
            .resource::<UnloadedSeen>()
            .0
            .iter()
            .any(|m| m == GEMMA)
    });
    // A few more frames: nothing may bring a model back by itself.
    for _ in 0..10 {
        app.update();
    }
    assert_eq!(
        *app.world().resource::<LlmModelState>(),
        LlmModelState::Unloaded
    );
    complete(&mut app, chat("Still there?").with_max_tokens(4));
    assert!(app.world().resource::<LlmModelState>().is_ready());
}
