using System.Runtime.InteropServices;
using System.Text;
using LLama;
using LLama.Common;
using LLama.Native;

namespace KernelLM.Tests.Fixtures;

/// <summary>
/// llama.cpp (LLamaSharp 0.30.0's CPU backend) as an oracle and as the CPU engine to race: a GGUF file loaded
/// with a fixed thread count, one sequence, token ids in, raw logits out, through the low-level API
/// (LLamaBatch + llama_decode + llama_get_logits_ith), not LLamaSharp's text executors.
///
/// Settings that matter for the numbers: flash attention off (the plain KQ / softmax / KQV graph); KV cache F32
/// (llama.cpp's default F16 cache would round K, V and, for the KQ product, Q to f16: an extra ~2^-11 relative
/// error per attention input that KernelLM's fp32 cache does not have); no GPU layers. Matrix products on the
/// CPU convert the activations to the weight's vec_dot type first (F32 for F32 weights, F16 for F16, BF16 for
/// BF16 weights) and accumulate in fp32: that rounding of the activations is the main difference to KernelLM,
/// which keeps activations in fp32 (see LlamaCppConformanceTests for the tolerance it implies).
/// </summary>
public sealed class LlamaCppModel : IDisposable
{
    private static readonly object s_logGate = new();
    private static readonly StringBuilder s_log = new();
    private static bool s_initialised;

    private readonly LLamaWeights _weights;
    private readonly LLamaContext _context;
    private readonly LLamaBatch _batch = new();

    private LlamaCppModel(LLamaWeights weights, LLamaContext context)
    {
        _weights = weights;
        _context = context;
        VocabularySize = weights.Vocab.Count;
    }

    public int VocabularySize { get; }

    public int ContextSize => (int)_context.ContextSize;

    /// <summary>Which native build was loaded and its CPU features (llama_print_system_info).</summary>
    public static string SystemInfo
    {
        get
        {
            Initialise();
            return Marshal.PtrToStringAnsi(NativeApi.llama_print_system_info()) ?? "";
        }
    }

    /// <summary>
    /// Loads <paramref name="ggufPath"/> (memory-mapped) with a context of <paramref name="contextSize"/> tokens
    /// that takes batches of up to <paramref name="batchSize"/> tokens in one ubatch. <paramref name="conformance"/>
    /// (the default) forces the F32 KV cache and plain attention described above; false keeps llama.cpp's own
    /// defaults for both (F16 cache, flash attention "auto"), which is what the CPU race measures. Either way the
    /// file is memory-mapped, llama.cpp's default (and what KernelLM does with safetensors).
    /// </summary>
    public static LlamaCppModel Load(string ggufPath, int threads, int contextSize, int batchSize, bool conformance = true)
    {
        Initialise();
        var parameters = new ModelParams(ggufPath)
        {
            ContextSize = (uint)contextSize,
            BatchSize = (uint)batchSize,
            UBatchSize = (uint)batchSize,
            SeqMax = 1,
            Threads = threads,
            BatchThreads = threads,
            GpuLayerCount = 0,
            // llama.cpp's own default (use_mmap), as KernelLM maps safetensors; LLamaSharp's default reads the file into RAM.
            LoadMode = LLamaLoadMode.MemoryMap,
        };
        if (conformance)
        {
            parameters.FlashAttention = false;
            parameters.TypeK = GGMLType.GGML_TYPE_F32;
            parameters.TypeV = GGMLType.GGML_TYPE_F32;
        }
        LLamaWeights? weights = null;
        try
        {
            weights = LLamaWeights.LoadFromFile(parameters);
            var context = weights.CreateContext(parameters);
            return new LlamaCppModel(weights, context);
        }
        catch (Exception error) when (error is not OutOfMemoryException)
        {
            weights?.Dispose();
            throw new InvalidOperationException($"llama.cpp could not load {ggufPath}: {error.Message}\nllama.cpp log:\n{TakeLog()}", error);
        }
    }

    /// <summary>Forgets every cached position (the next <see cref="Decode"/> starts at position 0).</summary>
    public void Clear() => _context.NativeHandle.MemoryClear(data: true);

    /// <summary>
    /// Runs <paramref name="tokens"/> at positions <paramref name="start"/>.. as one batch. With
    /// <paramref name="allPositions"/>, <paramref name="logits"/> receives [tokens, vocabulary]; otherwise the last
    /// position's [vocabulary] only (llama.cpp then computes the LM head for that row alone, as KernelLM does).
    /// </summary>
    public void Decode(ReadOnlySpan<int> tokens, int start, bool allPositions, Span<float> logits)
    {
        _batch.Clear();
        for (int i = 0; i < tokens.Length; i++)
        {
            _batch.Add(tokens[i], start + i, LLamaSeqId.Zero, allPositions || i == tokens.Length - 1);
        }
        var result = _context.NativeHandle.Decode(_batch);
        if (result != DecodeResult.Ok)
        {
            throw new InvalidOperationException($"llama_decode returned {result} for {tokens.Length} tokens at position {start}\nllama.cpp log:\n{TakeLog()}");
        }
        int vocabulary = VocabularySize;
        int first = allPositions ? 0 : tokens.Length - 1;
        for (int i = first; i < tokens.Length; i++)
        {
            _context.NativeHandle.GetLogitsIth(i)[..vocabulary].CopyTo(logits.Slice((i - first) * vocabulary, vocabulary));
        }
    }

    /// <summary>Warnings and errors llama.cpp logged since the last call (informational lines are dropped).</summary>
    public static string TakeLog()
    {
        lock (s_logGate)
        {
            string text = s_log.ToString();
            s_log.Clear();
            return text;
        }
    }

    private static void Initialise()
    {
        lock (s_logGate)
        {
            if (s_initialised)
            {
                return;
            }
            // Keep llama.cpp's chatter (hundreds of lines per load) out of the test output; keep what explains a failure.
            NativeLibraryConfig.All.WithCuda(false).WithVulkan(false).WithLogCallback((level, message) =>
            {
                if (level is LLamaLogLevel.Warning or LLamaLogLevel.Error)
                {
                    lock (s_logGate)
                    {
                        if (s_log.Length < 64 * 1024)
                        {
                            s_log.Append(message);
                        }
                    }
                }
            });
            NativeApi.llama_empty_call();
            s_initialised = true;
        }
    }

    public void Dispose()
    {
        _context.Dispose();
        _weights.Dispose();
    }
}
