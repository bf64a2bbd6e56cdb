/work/main/xtask/target/debug/deps/xtask-738c8e2f3ae94b31.d: src/main.rs Cargo.toml

/work/main/xtask/target/debug/deps/libxtask-738c8e2f3ae94b31.rmeta: src/main.rs Cargo.toml

src/main.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
