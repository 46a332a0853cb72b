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
