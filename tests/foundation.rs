//! The registry, settings and model-file verification, on the real
//! downloaded models.

mod common;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use bevy::prelude::*;
use bevy_npc_llm::errors::{RegistryError, SettingsError, VerifyError};
use bevy_npc_llm::prelude::*;
use bevy_npc_llm::registry::{
    ModelRegistry, PromptFormat, VerificationCache, VerifyOutcome, verify_model_file,
};
use bevy_npc_llm::settings::GpuLayers;
use bevy_npc_llm::{LlmDiagnostics, NpcLlmPlugin};
use common::*;

const SMOL_SHA: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const SMOL_SIZE: u64 = 98_362_432;

fn tmp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bevy_npc_llm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn shipped_manifest() -> String {
    std::fs::read_to_string(models_dir().join("models.ron")).unwrap()
}

#[test]
fn shipped_registry_parses_with_both_test_models() {
    let reg = ModelRegistry::load(models_dir().join("models.ron")).unwrap();
    assert_eq!(reg.len(), 2);
    let smol = reg.get(SMOL).unwrap();
    assert_eq!(smol.sha256, SMOL_SHA);
    assert_eq!(smol.size_bytes, SMOL_SIZE);
    assert_eq!(smol.prompt_format, PromptFormat::ChatTemplate);
    assert_eq!(smol.sampling.temperature, Some(0.7));
    let gemma = reg.get(GEMMA).unwrap();
    assert_eq!(gemma.prompt_format, PromptFormat::Completion);
    assert_eq!(reg.default_model().unwrap().id, SMOL);
    assert_eq!(reg.select("auto").unwrap().id, SMOL);
    assert_eq!(
        reg.with_tag("base")
            .map(|e| e.id.as_str())
            .collect::<Vec<_>>(),
        [GEMMA]
    );
    assert_eq!(reg.with_tag("test").count(), 2);
    assert_eq!(reg.resolve(SMOL).unwrap(), smol_file());
    assert!(matches!(
        reg.require("nope"),
        Err(RegistryError::UnknownModel { .. })
    ));
}

#[test]
fn each_required_field_missing_is_a_parse_error_naming_it() {
    let text = shipped_manifest();
    for field in [
        "id",
        "name",
        "file",
        "sha256",
        "size_bytes",
        "context_length",
        "quantization",
        "memory_estimate_bytes",
        "prompt_format",
    ] {
        // Drop the field's line from the first entry only.
        let needle = format!("\n            {field}: ");
        let start = text
            .find(&needle)
            .unwrap_or_else(|| panic!("{field} not in manifest"));
        let end = start + 1 + text[start + 1..].find('\n').unwrap();
        let broken = format!("{}{}", &text[..start], &text[end..]);
        let err = ModelRegistry::from_ron_str(&broken, "m", "models.ron").unwrap_err();
        match &err {
            RegistryError::Parse { line, message, .. } => {
                assert!(*line > 1, "{field}: {err}");
                assert!(message.contains(field), "{field}: {err}");
            }
            other => panic!("{field}: expected a parse error, got {other:?}"),
        }
    }
}

#[test]
fn bad_types_unknown_fields_and_unknown_prompt_format_are_located() {
    let text = shipped_manifest();
    let cases = [
        ("size_bytes: 98362432", "size_bytes: \"big\"", "size_bytes"),
        ("size_bytes: 98362432", "size_bytes: -5", "size_bytes"),
        (
            "prompt_format: ChatTemplate",
            "prompt_format: Jinja",
            "Jinja",
        ),
        (
            "quantization: \"Q4_1\",",
            "quantization: \"Q4_1\", colour: 3,",
            "colour",
        ),
        ("tags: [\"instruct\"", "tags: [1", "tags"),
    ];
    for (from, to, expect) in cases {
        let broken = text.replacen(from, to, 1);
        assert_ne!(broken, text);
        let err = ModelRegistry::from_ron_str(&broken, "m", "models.ron").unwrap_err();
        let RegistryError::Parse { line, column, .. } = &err else {
            panic!("{to}: {err:?}")
        };
        eprintln!("{err}");
        assert!(err.to_string().contains(expect), "{to}: {err}");
        assert!(*line >= 10 && *column > 1, "{to}: {err}");
        assert!(
            err.to_string()
                .starts_with(&format!("models.ron:{line}:{column}:"))
        );
    }
    // Not RON at all.
    assert!(matches!(
        ModelRegistry::from_ron_str("{ \"json\": true }", "m", "x"),
        Err(RegistryError::Parse { .. })
    ));
}

#[test]
fn semantic_mistakes_are_invalid_entries() {
    let text = shipped_manifest();
    let cases = [
        (SMOL_SHA, "abc", "sha256"),
        ("size_bytes: 98362432", "size_bytes: 0", "size_bytes"),
        (
            "context_length: 8192",
            "context_length: 0",
            "context_length",
        ),
        (
            "temperature: Some(0.7)",
            "temperature: Some(-1.0)",
            "sampling",
        ),
        ("id: \"smollm2-135m-instruct-q4_1\"", "id: \"Bad Id\"", "id"),
    ];
    for (from, to, field) in cases {
        let broken = text.replacen(from, to, 1);
        match ModelRegistry::from_ron_str(&broken, "m", "x") {
            Err(RegistryError::Invalid { field: f, .. }) => assert_eq!(f, field, "{to}"),
            other => panic!("{to}: {other:?}"),
        }
    }
    let dup = text.replacen(
        "id: \"gemma3-270m-q4_k_m\"",
        "id: \"smollm2-135m-instruct-q4_1\"",
        1,
    );
    assert!(matches!(
        ModelRegistry::from_ron_str(&dup, "m", "x"),
        Err(RegistryError::DuplicateId(_))
    ));
    let bad_default = text.replacen("default_model: \"smollm2", "default_model: \"zzz", 1);
    assert!(matches!(
        ModelRegistry::from_ron_str(&bad_default, "m", "x"),
        Err(RegistryError::UnknownModel { .. })
    ));
}

/// A relative `file` that climbs out of the models folder is refused (a
/// download would write there); absolute paths stay the documented opt-in,
/// and harmless relative forms (`./`, sub-folders) are kept.
#[test]
fn relative_model_files_stay_inside_the_models_folder() {
    let text = shipped_manifest();
    let file = "file: \"SmolLM2-135M-Instruct.Q4_1.gguf\"";
    assert!(text.contains(file));
    for bad in [
        "../SmolLM2.gguf",
        "../../home/user/.bashrc",
        "sub/../../escape.gguf",
        "a/./../../b.gguf",
    ] {
        let broken = text.replacen(file, &format!("file: {bad:?}"), 1);
        match ModelRegistry::from_ron_str(&broken, "m", "x") {
            Err(RegistryError::Invalid { field, message, .. }) => {
                assert_eq!(field, "file", "{bad}");
                assert!(message.contains(".."), "{bad}: {message}");
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
    for good in [
        "./SmolLM2.gguf",
        "sub/dir/SmolLM2.gguf",
        "/opt/models/SmolLM2.gguf",
    ] {
        let ok = text.replacen(file, &format!("file: {good:?}"), 1);
        let reg = ModelRegistry::from_ron_str(&ok, "m", "x").unwrap();
        let path = reg.resolve(SMOL).unwrap();
        assert!(
            path.starts_with("m") || path.is_absolute(),
            "{good}: {}",
            path.display()
        );
    }
    let mut reg = ModelRegistry::load(models_dir().join("models.ron")).unwrap();
    let mut e = reg.get(SMOL).unwrap().clone();
    e.id = "climber".into();
    e.file = "../climber.gguf".into();
    assert!(matches!(
        reg.add(e),
        Err(RegistryError::Invalid { field: "file", .. })
    ));
}

#[test]
fn entries_can_be_added_at_run_time() {
    let mut reg = ModelRegistry::load(models_dir().join("models.ron")).unwrap();
    let mut e = reg.get(SMOL).unwrap().clone();
    e.id = "my-finetune".into();
    e.file = "/opt/models/finetune.gguf".into();
    e.tags = vec!["custom".into()];
    reg.add(e.clone()).unwrap();
    assert_eq!(reg.with_tag("custom").count(), 1);
    assert_eq!(
        reg.resolve("my-finetune").unwrap(),
        PathBuf::from("/opt/models/finetune.gguf")
    );
    assert!(matches!(reg.add(e), Err(RegistryError::DuplicateId(_))));
}

#[test]
fn sha256_match_mismatch_size_and_missing_on_the_real_models() {
    let smol = smol_file();
    assert_eq!(
        verify_model_file(&smol, SMOL_SHA, SMOL_SIZE, None, |_, _| true).unwrap(),
        VerifyOutcome::Hashed
    );
    let reg = ModelRegistry::load(models_dir().join("models.ron")).unwrap();
    let g = reg.get(GEMMA).unwrap();
    let mut chunks = 0;
    let mut last = (0, 0);
    verify_model_file(&gemma_file(), &g.sha256, g.size_bytes, None, |d, t| {
        chunks += 1;
        last = (d, t);
        true
    })
    .unwrap();
    // Streamed in 1 MiB chunks with progress up to the full size.
    assert_eq!(chunks, g.size_bytes.div_ceil(1 << 20));
    assert_eq!(last, (g.size_bytes, g.size_bytes));

    // The Gemma file against SmolLM2's entry: size mismatch, found before hashing.
    let err = verify_model_file(&gemma_file(), SMOL_SHA, SMOL_SIZE, None, |_, _| true).unwrap_err();
    assert!(matches!(err, VerifyError::SizeMismatch { .. }), "{err}");
    let wrong = "f".repeat(64);
    let err = verify_model_file(&smol, &wrong, SMOL_SIZE, None, |_, _| true).unwrap_err();
    match err {
        VerifyError::Sha256Mismatch { actual, .. } => assert_eq!(actual, SMOL_SHA),
        other => panic!("{other:?}"),
    }
    let err = verify_model_file(
        &models_dir().join("nope.gguf"),
        SMOL_SHA,
        1,
        None,
        |_, _| true,
    )
    .unwrap_err();
    assert!(matches!(err, VerifyError::Missing(_)));
    assert!(err.to_string().contains("fetch-models.sh"));
    let err = verify_model_file(&models_dir(), SMOL_SHA, 1, None, |_, _| true).unwrap_err();
    assert!(matches!(err, VerifyError::NotAFile(_)));
    let err = verify_model_file(&smol, SMOL_SHA, SMOL_SIZE, None, |_, _| false).unwrap_err();
    assert_eq!(err, VerifyError::Aborted);
}

#[test]
fn verification_cache_skips_hashing_until_the_file_changes() {
    let dir = tmp_dir("cache");
    let copy = dir.join("model.gguf");
    std::fs::copy(smol_file(), &copy).unwrap();
    let cache = VerificationCache::new(dir.join("cache.ron"));
    let verify = || {
        let mut reads = 0u64;
        let out = verify_model_file(&copy, SMOL_SHA, SMOL_SIZE, Some(&cache), |_, _| {
            reads += 1;
            true
        })
        .unwrap();
        (out, reads)
    };
    let (first, reads) = verify();
    assert_eq!(first, VerifyOutcome::Hashed);
    assert!(reads > 90);
    let (second, reads) = verify();
    assert_eq!((second, reads), (VerifyOutcome::Cached, 1));
    // Touching the file (new mtime) makes it hashed again.
    let f = std::fs::File::options().write(true).open(&copy).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    drop(f);
    assert_eq!(verify().0, VerifyOutcome::Hashed);
    assert_eq!(verify().0, VerifyOutcome::Cached);
    // A changed file with the same size and a new mtime fails, and is not cached.
    let mut bytes = std::fs::read(&copy).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&copy, bytes).unwrap();
    let err = verify_model_file(&copy, SMOL_SHA, SMOL_SIZE, Some(&cache), |_, _| true).unwrap_err();
    assert!(matches!(err, VerifyError::Sha256Mismatch { .. }));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn plugin_load_hashes_once_then_uses_the_cache() {
    let dir = tmp_dir("plugin-cache");
    let load_once = || {
        let mut app = App::new();
        app.add_plugins(MinimalPlugins).add_plugins(
            NpcLlmPlugin::default()
                .with_registry_path(models_dir().join("models.ron"))
                .with_settings(settings())
                .with_verification_cache(dir.join("verify.ron"))
                .with_load_on_startup(true),
        );
        run_until(&mut app, 60, |app| {
            app.world().resource::<LlmModelState>().is_ready()
        });
        match app.world().resource::<LlmModelState>() {
            LlmModelState::Ready(info) => info.hashed,
            _ => unreachable!(),
        }
    };
    assert!(load_once(), "first start hashes");
    assert!(!load_once(), "second start uses the cache");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn settings_defaults_file_and_validation() {
    let s = LlmSettings::default();
    s.validate().unwrap();
    assert_eq!(s.model, "auto");
    let s = LlmSettings::from_ron_str(
        "(model: \"x\", threads: 3, gpu_layers: Count(10), sampling: (seed: 5, stop: [\"\\nBob:\"]))",
        "s",
    )
    .unwrap();
    assert_eq!(s.threads, 3);
    assert_eq!(s.gpu_layers, GpuLayers::Count(10));
    assert_eq!(s.sampling.seed, Some(5));
    let s = LlmSettings::from_ron_str(
        "(gpu: (device_sampling: Some(true), kv_unified: Some(false), flash_attention: None, sampling_threads: 4, lanes: 3))",
        "s",
    )
    .unwrap();
    assert_eq!(s.gpu.device_sampling, Some(true));
    assert_eq!(s.gpu.kv_unified, Some(false));
    assert_eq!(s.gpu.sampling_threads, 4);
    assert_eq!(s.gpu.lanes, 3);
    assert_eq!(LlmSettings::default().gpu.device_sampling, None);
    let invalid = [
        ("(gpu: (sampling_threads: 65))", "gpu.sampling_threads"),
        ("(gpu: (lanes: 9))", "gpu.lanes"),
        ("(sampling: (temperature: -0.5))", "sampling.temperature"),
        ("(context_per_sequence: 0)", "context_per_sequence"),
        ("(max_parallel_sequences: 0)", "max_parallel_sequences"),
        ("(sampling: (top_p: 0.0))", "sampling.top_p"),
        ("(sampling: (min_p: 1.0))", "sampling.min_p"),
        ("(sampling: (max_tokens: 0))", "sampling.max_tokens"),
        (
            "(sampling: (repeat_penalty: 0.0))",
            "sampling.repeat_penalty",
        ),
        ("(sampling: (stop: [\"\"]))", "sampling.stop"),
        ("(batch_size: 1)", "batch_size"),
        // One output per sequence plus the player's slot: llama.cpp aborts otherwise.
        ("(max_parallel_sequences: 8, batch_size: 8)", "batch_size"),
        ("(max_parallel_sequences: 8, batch_size: 9)", "batch_size"),
        (
            "(max_parallel_sequences: 256, batch_size: 512)",
            "max_parallel_sequences",
        ),
        ("(model: \"\")", "model"),
        (
            "(context_per_sequence: 128, sampling: (max_tokens: 200))",
            "sampling.max_tokens",
        ),
    ];
    for (text, field) in invalid {
        match LlmSettings::from_ron_str(text, "s") {
            Err(SettingsError::Invalid { field: f, .. }) => assert_eq!(f, field, "{text}"),
            other => panic!("{text}: {other:?}"),
        }
    }
    let parse = [
        "(threads: -1)",
        "(temperature: 0.5)",
        "(sampling: (temperature: \"hot\"))",
        "(gpu_layers: Lots)",
        "(gpu: (flash_attention: \"yes\"))",
        "(gpu: (turbo: true))",
        "(",
    ];
    for text in parse {
        match LlmSettings::from_ron_str(text, "llm_settings.ron") {
            Err(e @ SettingsError::Parse { .. }) => {
                assert!(e.to_string().starts_with("llm_settings.ron:1:"), "{e}")
            }
            other => panic!("{text}: {other:?}"),
        }
    }
    let err = LlmSettings::from_ron_str("(\n  sampling: (\n    top_k: \"x\"))", "f").unwrap_err();
    assert!(
        err.to_string().contains("f:3:") && err.to_string().contains("top_k"),
        "{err}"
    );
    // Files.
    let dir = tmp_dir("settings");
    assert_eq!(
        LlmSettings::load_or_default(dir.join("absent.ron")).unwrap(),
        LlmSettings::default()
    );
    std::fs::write(dir.join("s.ron"), "(queue_capacity: 3)").unwrap();
    assert_eq!(
        LlmSettings::load(dir.join("s.ron")).unwrap().queue_capacity,
        3
    );
    assert!(matches!(
        LlmSettings::load(dir.join("absent.ron")),
        Err(SettingsError::Io { .. })
    ));
    let _ = std::fs::remove_dir_all(dir);
}

/// Numbers in a settings file have upper bounds too: values near their
/// type's limit (a batch of `u32::MAX` tokens would be allocated at load) are
/// typed errors naming the field.
#[test]
fn settings_numbers_near_their_type_limits_are_refused() {
    for (text, field) in [
        ("(batch_size: 4294967295)", "batch_size"),
        ("(prompt_chunk: 4294967295)", "prompt_chunk"),
        ("(queue_capacity: 4294967295)", "queue_capacity"),
        (
            "(backend: Remote, remote: (retry_backoff_ms: 18446744073709551615))",
            "remote.retry_backoff_ms",
        ),
        (
            "(backend: Remote, remote: (request_timeout_ms: 0))",
            "remote.token_timeout_ms",
        ),
    ] {
        match LlmSettings::from_ron_str(text, "s.ron") {
            Err(SettingsError::Invalid { field: f, .. }) => assert_eq!(f, field, "{text}"),
            other => panic!("{text}: {other:?}"),
        }
    }
}

#[test]
fn bad_registry_and_settings_files_keep_the_app_running_with_diagnostics() {
    let dir = tmp_dir("bad-files");
    std::fs::write(dir.join("models.ron"), "(models: [ (id: 3) ])").unwrap();
    std::fs::write(dir.join("settings.ron"), "(sampling: (temperature: -2.0))").unwrap();
    let mut app = App::new();
    app.add_plugins(MinimalPlugins).add_plugins(
        NpcLlmPlugin::default()
            .with_registry_path(dir.join("models.ron"))
            .with_settings_path(Some(dir.join("settings.ron"))),
    );
    app.update();
    let d = app.world().resource::<LlmDiagnostics>();
    assert!(matches!(
        d.registry_error,
        Some(RegistryError::Parse { .. })
    ));
    assert!(matches!(
        d.settings_error,
        Some(SettingsError::Invalid { .. })
    ));
    assert_eq!(
        *app.world().resource::<LlmSettings>(),
        LlmSettings::default()
    );
    // A request fails with a typed error instead of panicking or hanging.
    let e = app.world_mut().spawn(LlmRequest::raw("hello")).id();
    for _ in 0..10 {
        app.update();
    }
    let status = app.world().get::<LlmRequestStatus>(e).unwrap();
    assert!(
        matches!(
            status.state,
            RequestState::Failed(LlmError::ModelUnavailable(_))
        ),
        "{status:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
