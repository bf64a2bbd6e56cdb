//! Model downloads against a real HTTP server on 127.0.0.1 with faults
//! (`tests/support/file_server.py`): resume after a dropped connection
//! (asserted from the server's log: no byte fetched twice), a server that
//! ignores Range, a wrong hash, a missing first mirror, a stalled server, two
//! downloads of one file at once, a partial file left by an earlier run, no
//! disk space, offline and plain-http refusals, and the real SmolLM2 file
//! downloaded, loaded and asked a question. Bounded by frame counts.

mod common;

use std::path::{Path, PathBuf};

use bevy::prelude::*;
use bevy_npc_llm::errors::{DownloadError, LlmError, ModelLoadError};
use bevy_npc_llm::events::LoadPhase;
use bevy_npc_llm::prelude::*;
use bevy_npc_llm::registry::{DownloadSource, ModelRegistry};
use common::servers::{Server, file_server};
use common::*;
use sha2::{Digest, Sha256};

const FRAMES: u32 = 200_000;

#[derive(Resource, Default)]
struct Outcomes {
    done: Vec<ModelDownloaded>,
    failed: Vec<ModelDownloadFailed>,
    progress: usize,
}

fn record(
    mut o: ResMut<Outcomes>,
    mut done: MessageReader<ModelDownloaded>,
    mut failed: MessageReader<ModelDownloadFailed>,
    mut progress: MessageReader<ModelDownloadProgress>,
) {
    o.done.extend(done.read().cloned());
    o.failed.extend(failed.read().cloned());
    o.progress += progress.read().count();
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A temporary folder with a served file of `size` pseudo-random bytes.
struct Fixture {
    dir: PathBuf,
    bytes: Vec<u8>,
    log: PathBuf,
    server: Server,
}

impl Fixture {
    fn new(name: &str, size: usize) -> Self {
        let dir = std::env::temp_dir().join(format!("npc-llm-dl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("served")).unwrap();
        let mut x: u32 = 0x9E37_79B9;
        let bytes: Vec<u8> = (0..size)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let source = dir.join("served/blob.bin");
        std::fs::write(&source, &bytes).unwrap();
        let log = dir.join("requests.log");
        let server = file_server(&source, &log);
        Self {
            dir,
            bytes,
            log,
            server,
        }
    }

    fn url(&self, mode: &str) -> String {
        format!("{}/{mode}/blob.gguf", self.server.url)
    }

    fn dest(&self) -> PathBuf {
        self.dir.join("models/blob.gguf")
    }

    /// (range header, status, body bytes) of every request the server saw.
    fn requests(&self) -> Vec<(Option<String>, u64, u64)> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["range"].as_str().map(String::from),
                    v["status"].as_u64().unwrap(),
                    v["sent"].as_u64().unwrap(),
                )
            })
            .collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An app whose registry holds `blob` (the fixture's file, its size and
/// hash) downloadable from `urls`.
fn app_for(f: &Fixture, urls: Vec<String>, tweak: impl FnOnce(&mut LlmSettings)) -> App {
    let mut s = settings();
    s.downloads.allow_http = true;
    s.downloads.retry_backoff_ms = 20;
    s.downloads.read_timeout_ms = 2_000;
    tweak(&mut s);
    let mut app = app_with(s);
    app.init_resource::<Outcomes>().add_systems(Update, record);
    app.update();
    let mut reg = app.world_mut().resource_mut::<ModelRegistry>();
    let mut e = reg.get(SMOL).unwrap().clone();
    e.id = "blob".into();
    e.file = f.dest();
    e.sha256 = sha256_hex(&f.bytes);
    e.size_bytes = f.bytes.len() as u64;
    e.download = Some(DownloadSource { urls });
    reg.add(e).unwrap();
    app
}

/// Ask for the download and run until it ends.
fn download(app: &mut App) -> Result<PathBuf, DownloadError> {
    download_of(app, "blob")
}

/// Ask for registry model `id`'s download and run until it ends.
fn download_of(app: &mut App, id: &str) -> Result<PathBuf, DownloadError> {
    app.world_mut()
        .write_message(DownloadModel { id: id.into() });
    for _ in 0..FRAMES {
        app.update();
        let o = app.world().resource::<Outcomes>();
        if let Some(d) = o.done.first() {
            return Ok(d.path.clone());
        }
        if let Some(e) = o.failed.first() {
            return Err(e.error.clone());
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!("download did not end in {FRAMES} frames");
}

fn assert_whole(f: &Fixture, path: &Path) {
    let got = std::fs::read(path).unwrap();
    assert_eq!(got.len(), f.bytes.len());
    assert!(got == f.bytes, "downloaded bytes differ");
    assert!(!Path::new(&format!("{}.part", path.display())).exists());
    assert!(!Path::new(&format!("{}.lock", path.display())).exists());
}

#[test]
fn a_dropped_connection_resumes_without_fetching_a_byte_twice() {
    let f = Fixture::new("drop", 3 << 20);
    let mut app = app_for(&f, vec![f.url("drop/1500000")], |_| {});
    let path = download(&mut app).unwrap();
    assert_whole(&f, &path);
    let reqs = f.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[0], (None, 200, 1_500_000));
    assert_eq!(
        reqs[1],
        (Some("bytes=1500000-".into()), 206, (3 << 20) - 1_500_000)
    );
    let served: u64 = reqs.iter().map(|r| r.2).sum();
    assert_eq!(served, f.bytes.len() as u64, "bytes fetched twice");
    assert!(app.world().resource::<Outcomes>().progress > 0);
    assert!(
        !app.world()
            .resource::<ModelDownloads>()
            .is_downloading("blob")
    );
}

#[test]
fn a_partial_file_from_an_earlier_run_is_resumed() {
    let f = Fixture::new("earlier", 2 << 20);
    std::fs::create_dir_all(f.dir.join("models")).unwrap();
    std::fs::write(
        format!("{}.part", f.dest().display()),
        &f.bytes[..1_000_000],
    )
    .unwrap();
    let mut app = app_for(&f, vec![f.url("plain")], |_| {});
    let path = download(&mut app).unwrap();
    assert_whole(&f, &path);
    assert_eq!(
        f.requests(),
        vec![(Some("bytes=1000000-".into()), 206, (2 << 20) - 1_000_000)]
    );
}

#[test]
fn a_server_that_ignores_range_restarts_from_zero_cleanly() {
    let f = Fixture::new("norange", 2 << 20);
    let mut app = app_for(&f, vec![f.url("dropnorange/700000")], |_| {});
    let path = download(&mut app).unwrap();
    assert_whole(&f, &path);
    let reqs = f.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[1].0.as_deref(), Some("bytes=700000-"));
    assert_eq!((reqs[1].1, reqs[1].2), (200, 2 << 20), "whole file again");
}

#[test]
fn a_wrong_hash_is_never_kept_or_loaded() {
    let f = Fixture::new("bad", 1 << 20);
    let mut app = app_for(&f, vec![f.url("bad")], |s| s.downloads.max_retries = 0);
    match download(&mut app) {
        Err(DownloadError::HashMismatch { expected, found }) => {
            assert_eq!(expected, sha256_hex(&f.bytes));
            assert_ne!(found, expected);
        }
        other => panic!("{other:?}"),
    }
    assert!(!f.dest().exists(), "a wrong file took the model's name");
    assert!(!Path::new(&format!("{}.part", f.dest().display())).exists());
    // Loading it downloads again, fails the same way, and loads nothing.
    let error = load_failure(&mut app, Some("blob"));
    assert!(
        matches!(
            error,
            ModelLoadError::Download(DownloadError::HashMismatch { .. })
        ),
        "{error}"
    );
    assert!(!f.dest().exists());
    assert!(
        app.world()
            .resource::<LlmEngineStats>()
            .serving_model
            .is_none()
    );
}

#[test]
fn a_missing_first_mirror_falls_over_to_the_second() {
    let f = Fixture::new("mirror", 1 << 20);
    let mut app = app_for(&f, vec![f.url("missing"), f.url("plain")], |_| {});
    let path = download(&mut app).unwrap();
    assert_whole(&f, &path);
    let reqs = f.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!((reqs[0].1, reqs[1].1), (404, 200));
}

#[test]
fn a_stalled_server_times_out_typed() {
    let f = Fixture::new("stall", 1 << 20);
    let mut app = app_for(&f, vec![f.url("stall")], |s| {
        s.downloads.read_timeout_ms = 300;
        s.downloads.max_retries = 1;
    });
    match download(&mut app) {
        Err(DownloadError::Timeout { waited_ms, .. }) => assert_eq!(waited_ms, 300),
        other => panic!("{other:?}"),
    }
    assert!(!f.dest().exists());
}

#[test]
fn two_instances_downloading_one_file_never_corrupt_it() {
    let f = Fixture::new("twice", 2 << 20);
    // Slow enough that both start while the first runs.
    let url = f.url("slow/4000000");
    let mut a = app_for(&f, vec![url.clone()], |_| {});
    let mut b = app_for(&f, vec![url], |_| {});
    a.world_mut()
        .write_message(DownloadModel { id: "blob".into() });
    b.world_mut()
        .write_message(DownloadModel { id: "blob".into() });
    let mut ends = 0;
    for _ in 0..FRAMES {
        a.update();
        b.update();
        ends = [&a, &b]
            .iter()
            .map(|app| {
                let o = app.world().resource::<Outcomes>();
                o.done.len() + o.failed.len()
            })
            .sum();
        if ends == 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(ends, 2);
    let outcomes: Vec<_> = [&a, &b]
        .iter()
        .map(|app| {
            let o = app.world().resource::<Outcomes>();
            (o.done.len(), o.failed.first().map(|e| e.error.clone()))
        })
        .collect();
    let won = outcomes.iter().filter(|o| o.0 == 1).count();
    assert!(won >= 1, "{outcomes:?}");
    for (done, failed) in &outcomes {
        if *done == 0 {
            assert!(
                matches!(failed, Some(DownloadError::Busy { .. })),
                "{outcomes:?}"
            );
        }
    }
    assert_whole(&f, &f.dest());
}

#[test]
fn offline_plain_http_and_a_full_disk_are_refused_typed() {
    let f = Fixture::new("refused", 64 << 10);
    let mut app = app_for(&f, vec![f.url("plain")], |s| s.downloads.offline = true);
    assert_eq!(download(&mut app), Err(DownloadError::Offline));
    let mut app = app_for(&f, vec![f.url("plain")], |s| s.downloads.allow_http = false);
    assert!(matches!(
        download(&mut app),
        Err(DownloadError::Refused { .. })
    ));
    // https is the default and built in: a server that does not speak TLS
    // fails the handshake, typed, after the retries.
    let mut app = app_for(
        &f,
        vec![f.url("plain").replace("http://", "https://")],
        |s| {
            s.downloads.allow_http = false;
            s.downloads.max_retries = 0;
        },
    );
    assert!(
        matches!(download(&mut app), Err(DownloadError::Network { .. })),
        "an https URL is tried (TLS compiled in) and fails typed"
    );
    // A file larger than any disk here.
    let mut app = app_for(&f, vec![f.url("plain")], |_| {});
    {
        let mut reg = app.world_mut().resource_mut::<ModelRegistry>();
        let mut e = reg.get("blob").unwrap().clone();
        e.id = "huge".into();
        e.size_bytes = 1 << 60;
        reg.add(e).unwrap();
    }
    app.world_mut()
        .write_message(DownloadModel { id: "huge".into() });
    let mut failed = None;
    for _ in 0..FRAMES {
        app.update();
        if let Some(e) = app.world().resource::<Outcomes>().failed.first() {
            failed = Some(e.error.clone());
            break;
        }
    }
    assert!(
        matches!(failed, Some(DownloadError::NotEnoughDisk { needed, .. }) if needed == 1 << 60),
        "{failed:?}"
    );
    assert!(f.requests().is_empty(), "nothing was fetched");
    // No source, unknown id.
    app.world_mut().write_message(DownloadModel {
        id: "smollm2-135m-instruct-q4_1".into(),
    });
    app.world_mut()
        .write_message(DownloadModel { id: "nope".into() });
    app.update();
    app.update();
    let errors: Vec<_> = app
        .world()
        .resource::<Outcomes>()
        .failed
        .iter()
        .map(|e| e.error.clone())
        .collect();
    assert!(errors.contains(&DownloadError::NoSource(
        "smollm2-135m-instruct-q4_1".into()
    )));
    assert!(errors.contains(&DownloadError::UnknownModel("nope".into())));
}

/// The real SmolLM2 file served from disk, downloaded, loaded (its sha256
/// checked again by the load) and asked one question.
#[test]
fn the_real_model_downloads_then_loads_and_answers() {
    let dir = std::env::temp_dir().join(format!("npc-llm-dl-real-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("requests.log");
    let server = file_server(&smol_file(), &log);
    let mut s = settings();
    s.downloads.allow_http = true;
    let mut app = app_with(s);
    app.init_resource::<Outcomes>().add_systems(Update, record);
    app.update();
    {
        let mut reg = app.world_mut().resource_mut::<ModelRegistry>();
        let mut e = reg.get(SMOL).unwrap().clone();
        e.id = "smol-downloaded".into();
        e.file = dir.join("SmolLM2.gguf");
        e.download = Some(DownloadSource {
            urls: vec![format!("{}/plain/SmolLM2.gguf", server.url)],
        });
        reg.add(e).unwrap();
    }
    let path = download_of(&mut app, "smol-downloaded").expect("downloaded");
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        std::fs::metadata(smol_file()).unwrap().len()
    );
    load_ready(&mut app, Some("smol-downloaded"));
    let answer = complete(&mut app, chat("Say hello.").with_max_tokens(8));
    assert!(!answer.trim().is_empty());
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

/// Register `id`: SmolLM2's entry with its file in `dir`, downloadable from
/// the file server's `mode` path.
fn served_smol(app: &mut App, dir: &Path, server: &Server, id: &str, mode: &str) {
    let mut reg = app.world_mut().resource_mut::<ModelRegistry>();
    let mut e = reg.get(SMOL).unwrap().clone();
    e.id = id.into();
    e.file = dir.join(format!("{id}.gguf"));
    e.download = Some(DownloadSource {
        urls: vec![format!("{}/{mode}/{id}.gguf", server.url)],
    });
    reg.add(e).unwrap();
}

/// A request for a model whose file is missing downloads it first (the
/// model state says so), then loads it and answers; when the download fails,
/// the waiting request fails typed instead of hanging. A cancelled download
/// keeps its partial file.
#[test]
fn a_request_for_a_missing_model_downloads_it_first() {
    let dir = std::env::temp_dir().join(format!("npc-llm-dl-lazy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let server = file_server(&smol_file(), &dir.join("requests.log"));
    let entry = |app: &mut App, id: &str, mode: &str| served_smol(app, &dir, &server, id, mode);
    let mut s = settings();
    s.downloads.allow_http = true;
    s.model = "lazy".into();
    let mut app = app_with(s.clone());
    app.init_resource::<Outcomes>().add_systems(Update, record);
    app.update();
    entry(&mut app, "lazy", "plain");
    let e = request(&mut app, chat("Say hello.").with_max_tokens(8));
    let mut saw_downloading = false;
    run_until(&mut app, 120, |app| {
        saw_downloading |= matches!(
            app.world().resource::<LlmModelState>(),
            LlmModelState::Loading {
                phase: LoadPhase::Downloading,
                ..
            }
        );
        app.world().resource::<Recorded>().finished(e)
    });
    assert!(saw_downloading);
    let r = app.world().resource::<Recorded>();
    assert!(r.completed_text(e).is_some(), "{:?}", r.of(e));
    assert!(dir.join("lazy.gguf").exists());

    // A download that fails: the waiting request fails typed.
    s.model = "lazy-missing".into();
    let mut app = app_with(s.clone());
    app.init_resource::<Outcomes>().add_systems(Update, record);
    app.update();
    entry(&mut app, "lazy-missing", "missing");
    let e = request(&mut app, chat("Hello?"));
    run_until_finished(&mut app, &[e]);
    let failure = app.world().resource::<Recorded>().failure(e);
    assert!(
        matches!(
            failure,
            Some(LlmError::ModelUnavailable(ModelLoadError::Download(
                DownloadError::Status { status: 404, .. }
            )))
        ),
        "{failure:?}"
    );

    // Cancel mid-file: typed `Cancelled`, the partial file stays for a resume.
    s.model = SMOL.into();
    let mut app = app_with(s);
    app.init_resource::<Outcomes>().add_systems(Update, record);
    app.update();
    entry(&mut app, "slowpoke", "slow/2000000");
    app.world_mut().write_message(DownloadModel {
        id: "slowpoke".into(),
    });
    run_until(&mut app, 60, |app| {
        app.world()
            .resource::<ModelDownloads>()
            .progress("slowpoke")
            .is_some_and(|p| p.bytes > 0)
    });
    app.world_mut().write_message(CancelModelDownload {
        id: "slowpoke".into(),
    });
    run_until(&mut app, 60, |app| {
        !app.world().resource::<Outcomes>().failed.is_empty()
    });
    assert_eq!(
        app.world().resource::<Outcomes>().failed[0].error,
        DownloadError::Cancelled
    );
    let part = dir.join("slowpoke.gguf.part");
    assert!(std::fs::metadata(&part).is_ok_and(|m| m.len() > 0));
    assert!(!dir.join("slowpoke.gguf").exists());
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

/// The newest load or unload wins over one that waits for a download,
/// whatever order downloads end in: its progress no longer shows, its file
/// is not loaded in place of the newer model, and its failure fails only
/// what waited for it (a request streaming on the loaded model goes on).
#[test]
fn a_load_waiting_for_a_download_yields_to_a_newer_load_or_unload() {
    let dir = std::env::temp_dir().join(format!("npc-llm-dl-newest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let server = file_server(&smol_file(), &dir.join("requests.log"));
    let mut s = settings();
    s.downloads.allow_http = true;
    let mut app = app_with(s);
    app.init_resource::<Outcomes>().add_systems(Update, record);
    app.update();
    for (id, mode) in [("slow-b", "slow/400000"), ("gone-b", "missing")] {
        served_smol(&mut app, &dir, &server, id, mode);
    }
    load_ready(&mut app, Some(SMOL));
    let ready_on = |app: &App, id: &str| matches!(app.world().resource::<LlmModelState>(), LlmModelState::Ready(i) if i.model == id);
    // B needs a download; then A is asked for: A is loaded and stays.
    app.world_mut().write_message(LoadModel {
        model: Some("slow-b".into()),
    });
    run_until(&mut app, 60, |app| {
        app.world()
            .resource::<ModelDownloads>()
            .progress("slow-b")
            .is_some_and(|p| p.bytes > 0)
    });
    app.world_mut().write_message(LoadModel {
        model: Some(SMOL.into()),
    });
    run_until(&mut app, 60, |app| ready_on(app, SMOL));
    let streaming = request(&mut app, chat("Tell me a story.").with_max_tokens(48));
    for _ in 0..300 {
        app.update();
        assert!(
            ready_on(&app, SMOL),
            "B's download news must not move the state: {:?}",
            app.world().resource::<LlmModelState>()
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // B's download ends (cancelled here): nothing that ran on A fails.
    app.world_mut().write_message(CancelModelDownload {
        id: "slow-b".into(),
    });
    run_until(&mut app, 60, |app| {
        !app.world().resource::<Outcomes>().failed.is_empty()
    });
    run_until_finished(&mut app, &[streaming]);
    let r = app.world().resource::<Recorded>();
    assert!(
        r.completed_text(streaming).is_some(),
        "{:?}",
        r.of(streaming)
    );
    assert!(ready_on(&app, SMOL));

    // The newest load waits for a download that fails while A still
    // serves: that load fails, the request streaming on A does not.
    let streaming = request(&mut app, chat("And another one.").with_max_tokens(48));
    app.world_mut().write_message(LoadModel {
        model: Some("gone-b".into()),
    });
    run_until_finished(&mut app, &[streaming]);
    run_until(
        &mut app,
        60,
        |app| matches!(app.world().resource::<LlmModelState>(), LlmModelState::Failed { model, .. } if model == "gone-b"),
    );
    let r = app.world().resource::<Recorded>();
    assert!(
        r.completed_text(streaming).is_some(),
        "{:?}",
        r.of(streaming)
    );

    // Unload while a load waits for its download: unloaded, and it stays so.
    app.world_mut().write_message(LoadModel {
        model: Some("slow-b".into()),
    });
    run_until(&mut app, 60, |app| {
        matches!(
            app.world().resource::<LlmModelState>(),
            LlmModelState::Loading {
                phase: LoadPhase::Downloading,
                ..
            }
        )
    });
    app.world_mut().write_message(UnloadModel);
    for _ in 0..300 {
        app.update();
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(
        *app.world().resource::<LlmModelState>(),
        LlmModelState::Unloaded
    );
    app.world_mut().write_message(CancelModelDownload {
        id: "slow-b".into(),
    });
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}
