# Development tasks. `just ci` is exactly what CI runs.

export CARGO_TARGET_DIR := env_var_or_default("CARGO_TARGET_DIR", env_var("HOME") / ".cache/kiln-target")

# Format check, clippy, tests and the CUDA build check (CI's script).
ci:
    bash .ci/run

# The README's test command.
test:
    cargo test --workspace

# Train the smoke recipe.
smoke:
    cargo run -p kiln-cli -- train recipes/smoke/qwen2-tiny.toml --overwrite

# Format the code.
fmt:
    cargo fmt --all

# Lint with warnings denied.
clippy:
    cargo clippy --workspace --all-targets -- -D warnings

# Tokens/s of the smoke recipe on each CPU backend, side by side.
compare-backends:
    bash scripts/compare-backends.sh

# kiln and PyTorch side by side on one recipe's configuration (`kiln bench`, then
# scripts/bench_torch.py in .venv with torch and transformers); prints the ratio.
bench-compare recipe steps="10":
    cargo run -p kiln-cli -- bench {{recipe}} --steps {{steps}} --json "$CARGO_TARGET_DIR/kiln-bench.json" > /dev/null
    .venv/bin/python scripts/bench_torch.py --like "$CARGO_TARGET_DIR/kiln-bench.json" --json "$CARGO_TARGET_DIR/torch-bench.json" > /dev/null
