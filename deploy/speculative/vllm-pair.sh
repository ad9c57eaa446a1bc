#!/usr/bin/env bash
# Servers for the pair in policies.yaml, for either speculation mode. Edit the three names.
#
#   ./vllm-pair.sh engine    # one server: the large model, drafting with the small one inside vLLM
#   ./vllm-pair.sh gateway   # two servers: the gateway runs the draft/verify loop over their APIs
#
# Both models must share one tokenizer and vocabulary (same family, e.g. Llama-3.1-8B-Instruct
# drafting for Llama-3.1-70B-Instruct, or Qwen2.5-7B-Instruct for Qwen2.5-72B-Instruct).
set -euo pipefail

LARGE="${LARGE_MODEL:-meta-llama/Llama-3.1-70B-Instruct}"
SMALL="${SMALL_MODEL:-meta-llama/Llama-3.1-8B-Instruct}"
K="${NUM_SPECULATIVE_TOKENS:-4}"

case "${1:-}" in
  engine)
    # vLLM's own speculative decoding with a draft model. Recent vLLM wants "method": "draft_model";
    # older 0.x releases inferred the method from "model" and may reject the key: drop it there.
    exec vllm serve "$LARGE" \
      --served-model-name large \
      --port 8001 \
      --tensor-parallel-size "${LARGE_TP:-4}" \
      --speculative-config "{\"model\": \"$SMALL\", \"num_speculative_tokens\": $K, \"method\": \"draft_model\", \"draft_tensor_parallel_size\": 1}"
    ;;
  gateway)
    # Two ordinary servers. The gateway needs /tokenize and /detokenize (on by default), token-id
    # prompts, prompt_logprobs and return_tokens_as_token_ids on /v1/completions (vLLM >= 0.6),
    # and up to 20 logprobs per position (the default --max-logprobs) for temperature > 0.
    # Each server takes --gpu-memory-utilization (vLLM's default 0.9) of every GPU it sees, so on
    # the same GPUs the second fails for memory: the large one gets GPUs 0..LARGE_TP-1, the small
    # one the next (5 GPUs for TP 4). To share GPUs instead, give both the same ids and split the
    # memory: e.g. SMALL_GPUS=0 SMALL_GPU_MEMORY_UTILIZATION=0.2 LARGE_GPU_MEMORY_UTILIZATION=0.7.
    tp="${LARGE_TP:-4}"
    large_gpus="${LARGE_GPUS:-$(seq -s, 0 $((tp - 1)))}"
    small_gpus="${SMALL_GPUS:-$tp}"
    # Either server exiting, or this script being stopped, stops the other: the gateway needs both.
    trap 'exit 143' TERM
    trap 'exit 130' INT
    trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT
    CUDA_VISIBLE_DEVICES="$small_gpus" vllm serve "$SMALL" --served-model-name small --port 8000 \
      --max-logprobs 20 --gpu-memory-utilization "${SMALL_GPU_MEMORY_UTILIZATION:-0.9}" &
    CUDA_VISIBLE_DEVICES="$large_gpus" vllm serve "$LARGE" --served-model-name large --port 8001 \
      --tensor-parallel-size "$tp" --max-logprobs 20 --enable-prefix-caching \
      --gpu-memory-utilization "${LARGE_GPU_MEMORY_UTILIZATION:-0.9}" &
    status=0
    wait -n || status=$?
    echo "$0: a vLLM server exited (status $status); stopping the other" >&2
    exit $((status ? status : 1))
    ;;
  *)
    echo "usage: $0 engine|gateway" >&2
    exit 2
    ;;
esac
