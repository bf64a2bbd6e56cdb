/work/main/xtask/target/debug/deps/xtask-0b8efb09b6e1215f.d: src/main.rs

/work/main/xtask/target/debug/deps/xtask-0b8efb09b6e1215f: src/main.rs

src/main.rs:
