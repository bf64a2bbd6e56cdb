//! What this machine has: CPU cores and SIMD features, RAM, and the GPU
//! devices llama.cpp's backends can see.

use bevy::prelude::Resource;

/// The kind of an accelerator device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuKind {
    /// A discrete GPU with its own memory.
    Discrete,
    /// A GPU sharing system memory.
    Integrated,
    /// Another accelerator.
    Accelerator,
}

/// A GPU (or other accelerator) llama.cpp can use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuDevice {
    /// ggml's device index (for `LlamaModelParams::with_devices`).
    pub index: usize,
    /// Device name, e.g. `CUDA0`.
    pub name: String,
    /// Description, e.g. `NVIDIA H100 80GB HBM3`.
    pub description: String,
    /// Backend, e.g. `CUDA`, `Vulkan`, `Metal`.
    pub backend: String,
    /// Kind.
    pub kind: GpuKind,
    /// Total memory in bytes.
    pub memory_total_bytes: u64,
    /// Free memory in bytes.
    pub memory_free_bytes: u64,
    /// The widest prompt step whose recorded CUDA graph the device's module
    /// keeps per KV stream, when it is built with bevy_npc_llm's graph patch
    /// (`scripts/gpu/build-cuda-backend.sh`; docs/ARCHITECTURE.md); `None`:
    /// llama.cpp's module as shipped, or not CUDA. The plan rounds lone
    /// prompt steps by default only when this is
    /// [`CUDA_GRAPH_PATCH_WIDTH`](crate::hardware::CUDA_GRAPH_PATCH_WIDTH).
    pub graph_patch: Option<u32>,
}

/// The machine, detected once at startup on the worker thread.
#[derive(Resource, Debug, Clone, PartialEq, Eq, Default)]
pub struct HardwareProfile {
    /// CPU brand string.
    pub cpu_brand: String,
    /// Physical cores.
    pub physical_cores: usize,
    /// Logical cores (hardware threads).
    pub logical_cores: usize,
    /// SIMD features found (`avx`, `avx2`, `fma`, `f16c`, `avx512f`, `neon`, ...).
    pub simd: Vec<String>,
    /// Total RAM in bytes.
    pub ram_total_bytes: u64,
    /// Available RAM in bytes.
    pub ram_available_bytes: u64,
    /// GPU devices seen by llama.cpp's loaded backends.
    pub gpus: Vec<GpuDevice>,
    /// GPU backend libraries that were found but did not give a device (e.g.
    /// a CUDA backend shipped to a machine without an NVIDIA driver).
    pub failed_backends: Vec<String>,
    /// Folder the ggml backend modules were loaded from (dynamic-backends builds).
    pub backend_modules_dir: Option<std::path::PathBuf>,
}

impl HardwareProfile {
    /// Whether the CPU has the SIMD that makes llama.cpp fast (AVX2 or NEON).
    #[must_use]
    pub fn has_fast_simd(&self) -> bool {
        self.simd.iter().any(|f| f == "avx2" || f == "neon")
    }

    /// The GPU with the most free memory, discrete ones first.
    #[must_use]
    pub fn best_gpu(&self) -> Option<&GpuDevice> {
        self.gpus
            .iter()
            .max_by_key(|g| (g.kind == GpuKind::Discrete, g.memory_free_bytes))
    }

    /// Detect this machine: CPU and RAM from the operating system, GPUs from
    /// llama.cpp's backend registry (the backend must be initialised first).
    #[must_use]
    pub fn detect() -> Self {
        let mut profile = Self::detect_cpu_and_ram();
        profile.gpus = llama_cpp_2::list_llama_ggml_backend_devices()
            .into_iter()
            .filter_map(|d| {
                use llama_cpp_2::LlamaBackendDeviceType as T;
                let kind = match d.device_type {
                    T::Gpu => GpuKind::Discrete,
                    T::IntegratedGpu => GpuKind::Integrated,
                    T::Accelerator => GpuKind::Accelerator,
                    T::Cpu | T::Unknown => return None,
                };
                // BLAS and similar "accelerators" have no memory of their own.
                if kind == GpuKind::Accelerator && d.memory_total == 0 {
                    return None;
                }
                let graph_patch = if d.backend == "CUDA" {
                    cuda_graph_patch()
                } else {
                    None
                };
                Some(GpuDevice {
                    graph_patch,
                    index: d.index,
                    name: d.name,
                    description: d.description,
                    backend: d.backend,
                    kind,
                    memory_total_bytes: d.memory_total as u64,
                    memory_free_bytes: d.memory_free as u64,
                })
            })
            .collect();
        profile
    }

    /// Re-read free RAM and each GPU's free memory (matched by index and
    /// name), keeping everything else: memory changes while a game runs, so
    /// the plugin calls this before each model load.
    pub fn refresh_free_memory(&mut self) {
        let now = Self::detect();
        if now.ram_available_bytes > 0 {
            self.ram_available_bytes = now.ram_available_bytes;
        }
        for g in &mut self.gpus {
            if let Some(n) = now
                .gpus
                .iter()
                .find(|n| n.index == g.index && n.name == g.name)
            {
                g.memory_free_bytes = n.memory_free_bytes;
            }
        }
    }

    /// CPU and RAM only (no llama.cpp needed).
    #[must_use]
    pub fn detect_cpu_and_ram() -> Self {
        let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
        let physical = sysinfo::System::physical_core_count()
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or(logical)
            .min(logical);
        let (brand, total, available) = match sysinfo::System::new() {
            Ok(mut sys) => {
                sys.refresh_memory();
                sys.refresh_cpu_list(sysinfo::CpuRefreshKind::nothing());
                let brand = sys
                    .cpus()
                    .first()
                    .map(|c| c.brand().trim().to_string())
                    .unwrap_or_default();
                (brand, sys.total_memory(), sys.available_memory())
            }
            Err(_) => (String::new(), 0, 0),
        };
        Self {
            cpu_brand: brand,
            physical_cores: physical,
            logical_cores: logical,
            simd: simd_features(),
            ram_total_bytes: total,
            ram_available_bytes: available,
            gpus: Vec::new(),
            failed_backends: Vec::new(),
            backend_modules_dir: None,
        }
    }
}

fn simd_features() -> Vec<String> {
    #[allow(unused_mut)]
    let mut out: Vec<&str> = Vec::new();
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        macro_rules! check {
            ($($f:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($f) { out.push($f); }
            )*};
        }
        check!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vnni"
        );
    }
    #[cfg(target_arch = "aarch64")]
    {
        out.push("neon");
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            out.push("dotprod");
        }
    }
    out.into_iter().map(String::from).collect()
}

/// The width the loaded CUDA module's bevy_npc_llm graph patch answers to
/// the backend registry's proc-address query (`None`: no CUDA backend, or
/// one without the patch).
fn cuda_graph_patch() -> Option<u32> {
    // SAFETY: both calls only look names up in ggml's backend registry
    // (initialised with the llama.cpp backend before detection); the
    // patched module returns its width as the "address", never called.
    let width = unsafe {
        let reg = llama_cpp_sys_2::ggml_backend_reg_by_name(c"CUDA".as_ptr());
        if reg.is_null() {
            return None;
        }
        llama_cpp_sys_2::ggml_backend_reg_get_proc_address(
            reg,
            c"ggml_backend_cuda_npc_llm_graph_patch".as_ptr(),
        )
    };
    (!width.is_null()).then_some(width as usize as u32)
}
