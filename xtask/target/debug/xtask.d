/work/main/xtask/target/debug/xtask: /work/main/xtask/src/main.rs
