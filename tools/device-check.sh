#!/usr/bin/env bash
# tools/device-check.sh — the prepared GPU check, in two steps.
#
#   tools/device-check.sh prepare        here (needs the .NET SDK): publishes the whole NUnit suite as one
#                                        self-contained executable into .device-check/ (git-ignored; ~33 MB).
#   tools/device-check.sh run OUTDIR     on the GPU machine (no .NET there): runs the CUDA tests, the kernel
#                                        conformance suite and the model tests on the real device, then the
#                                        device report (per-kernel GB/s against a measured device-to-device
#                                        copy; vocab_stats at batch 1 and 8, and its share of a 1B / 8B decode
#                                        step; 1B / 8B-shaped prefill and decode tokens/s; flash-decoding at 32K
#                                        keys), and writes OUTDIR/report.json, report.txt, summary.txt and the logs;
#                                        TokenSelect's figures go to kv_select.json / kv_select.txt.
#
# With the device tool: prepare here, then run with carry [".device-check"] and a timeout that leaves room
# for a rerun: `bash tools/device-check.sh run $OUT`. Without a GPU, `run` still completes and says so:
# the GPU cases are skipped with "no CUDA device: ..." and report.json is absent.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/.device-check"

case "${1:-}" in
prepare)
    rm -rf "$bin"
    dotnet publish "$root/tests/KernelLM.Tests.csproj" -c Release -r linux-x64 -p:DeviceCheck=true -o "$bin/publish" -v quiet -nologo || exit 1
    mv "$bin/publish/KernelLM.Tests" "$bin/KernelLM.Tests"
    rm -rf "$bin/publish"
    du -sh "$bin"
    ;;
run)
    out="${2:?usage: tools/device-check.sh run OUTDIR}"
    mkdir -p "$out"
    if [ ! -x "$bin/KernelLM.Tests" ]; then
        echo "no $bin/KernelLM.Tests: run 'tools/device-check.sh prepare' first and carry .device-check" >&2
        exit 2
    fi
    export KERNELLM_REPOSITORY_ROOT="$root" KERNELLM_REPORT_DIR="$out"
    # The GPU machine's CUDA 13 NVRTC may live inside PyTorch's wheel rather than on the library path.
    if [ -z "${KERNELLM_LIBNVRTC:-}" ] && ! ldconfig -p 2>/dev/null | grep -q libnvrtc; then
        candidate=$(find / -name 'libnvrtc.so*' -not -name '*builtins*' 2>/dev/null | sort | tail -n 1)
        [ -n "$candidate" ] && export KERNELLM_LIBNVRTC="$candidate"
    fi
    { nvidia-smi || echo "nvidia-smi: not available"; } >"$out/nvidia-smi.txt" 2>&1
    status=0
    run_suite() {
        local name=$1 filter=$2
        local start=$SECONDS
        "$bin/KernelLM.Tests" --filter "$filter" --no-ansi --no-progress >"$out/$name.log" 2>&1 || status=1
        printf '%-12s %4ss  %s\n' "$name" $((SECONDS - start)) "$(grep -E '^\s*(total|failed|succeeded|skipped):' "$out/$name.log" | tr -s ' \n' ' ')" | tee -a "$out/summary.txt"
    }
    : >"$out/summary.txt"
    run_suite cuda "FullyQualifiedName~KernelLM.Tests.Cuda"
    run_suite conformance "FullyQualifiedName~Conformance"
    run_suite models "FullyQualifiedName~Golden|FullyQualifiedName~ReferenceDecoder|FullyQualifiedName~CudaSessionTests|FullyQualifiedName~CompositionDeviceTests"
    run_suite adaptive "FullyQualifiedName~AdaptiveDecodingModelTests|FullyQualifiedName~CudaRollbackTests|FullyQualifiedName~RoutingTests"
    run_suite report "FullyQualifiedName~Report_on_the_gpu"
    # TokenSelect: sessions with selection on the device, then its report (kv_select.json / .txt: attention per layer
    # step at 32K..1M with and without selection, the score kernel's GB/s, 8B decode tokens/s at 128K).
    run_suite kvselect "FullyQualifiedName~KvSelectDeviceTests|FullyQualifiedName~Kv_select_report_on_the_gpu"
    [ -f "$out/kv_select.txt" ] && cat "$out/kv_select.txt" >>"$out/summary.txt"
    if [ -f "$out/report.json" ]; then
        cat "$out/report.txt" >>"$out/summary.txt"
        [ -f "$out/composition.txt" ] && cat "$out/composition.txt" >>"$out/summary.txt"
    else
        echo "no report.json: no CUDA device here (see $out/report.log)" | tee -a "$out/summary.txt"
    fi
    exit $status
    ;;
*)
    echo "usage: tools/device-check.sh prepare | run OUTDIR" >&2
    exit 2
    ;;
esac
