#!/usr/bin/env bash
# `specray bench serve` against a real Ray Serve deployment of Qwen2.5-Coder-1.5B (GGUF) on one GPU, one
# speculation arm per server start: repo-level code completion at 16K-token prompts, batch 1.
#
#   benchmarks/serve_bench_gpu.sh ARM [NUM_PROMPTS] [OUTPUT_LEN]     # ARM: none | sparse_self | draft_model
#
# Needs ~/models/qwen2.5-coder-{1.5b,0.5b}.gguf (shared/gpu/stage-models), .stage/tok-qwen (the converted
# tokenizer) and Ray Serve importable (PYTHONPATH). Writes $OUT/bench-ARM.json and $OUT/serve-ARM.log.
set -euo pipefail
ARM=$1; N=${2:-6}; OLEN=${3:-128}
OUT=${OUT:-/tmp}; TOK=${TOK:-$PWD/.stage/tok-qwen}; NAME=${NAME:-qwen2.5-coder-1.5b}
MODEL=${MODEL:-$HOME/models/$NAME.gguf}; DRAFT=${DRAFT:-$HOME/models/qwen2.5-coder-0.5b.gguf}
DEVICE=${DEVICE:-cuda}; ILEN=${ILEN:-16384}; MAXLEN=${MAXLEN:-17408}
case $ARM in
  none) SPEC="{method: none}" ;;
  sparse_self) SPEC="{method: sparse_self, tree: {kind: chain, length: 4}, sparse: {page_size: 16, budget_tokens: 512}}" ;;
  draft_model) SPEC="{method: draft_model, model: $DRAFT, tree: {kind: chain, length: 4}, retrieval: {chunk_size: 32, top_k_chunks: 32, refresh_every: 4}}" ;;
  *) echo "unknown arm $ARM" >&2; exit 2 ;;
esac
CFG=$(mktemp --suffix=.yaml)
cat > "$CFG" <<YAML
http_options: {host: 127.0.0.1, port: 8000}
applications:
  - name: specray
    route_prefix: /
    import_path: specray.platform.serve:build_app
    args:
      served_model_name: $NAME
      arm: $ARM
      engine:
        model: $MODEL
        tokenizer: $TOK
        device: $DEVICE
        scheduler: {max_num_seqs: 4, max_num_batched_tokens: 4096, max_model_len: $MAXLEN}
        speculative_config: $SPEC
YAML
python3 -m specray.cli serve "$CFG" > "$OUT/serve-$ARM.log" 2>&1 & PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null || true' EXIT
for _ in $(seq 400); do
  curl -sf 127.0.0.1:8000/health >/dev/null && break
  kill -0 $PID 2>/dev/null || break  # the server exited: fail now
  sleep 1
done
curl -sf 127.0.0.1:8000/health >/dev/null || { tail -40 "$OUT/serve-$ARM.log"; exit 1; }
python3 -m specray.cli bench serve --base-url http://127.0.0.1:8000 --model $NAME --tokenizer "$TOK" \
  --dataset-name code --input-len $ILEN --output-len "$OLEN" --num-prompts "$N" --request-rate inf \
  --max-concurrency 1 --seed 0 --goodput tpot:50 --result-file "$OUT/bench-$ARM.json" 2>&1 | tail -25
