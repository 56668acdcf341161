using System.Numerics.Tensors;
using BenchmarkDotNet.Attributes;
using KernelLM.Models.Llama;

namespace KernelLM.Bench;

/// <summary>
/// Greedy decode on the embedded tiny-stories model. Setup prefills a <see cref="PromptLength"/>-token prompt
/// (the model's sample stories); one op = one <see cref="LlamaSession.Forward"/> of one token (the argmax of
/// the previous logits) plus that argmax. When the KV cache is full the session is rewound to just after the
/// prompt (KvCache.Length = PromptLength: the prompt's keys and values are still in place, so no re-prefill
/// is timed), so decode positions cycle through [PromptLength, ContextLength) and average ~288.
/// Columns: Tokens/s, GB/s = LlamaModel.BytesPerDecodedToken / time (weights only; see docs/benchmarks.md).
/// </summary>
public class DecodeBenchmark : IDisposable
{
    /// <summary>KV cache capacity of the session.</summary>
    public const int ContextLength = 512;

    /// <summary>Prompt tokens prefilled once at setup.</summary>
    public const int PromptLength = 64;

    private LlamaModel? _model;
    private LlamaSession? _session;
    private float[] _logits = [];
    private readonly int[] _token = new int[1];

    [Params(1, 2)]
    public int Threads { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        _model = EmbeddedModel.Load(Threads, ContextLength);
        _session = _model.CreateSession();
        _logits = new float[_model.Config.VocabularySize];
        _session.Forward(EmbeddedModel.PromptTokens(PromptLength), _logits);
        _token[0] = TensorPrimitives.IndexOfMax<float>(_logits);
    }

    [Benchmark(Description = "decode 1 token")]
    public int DecodeToken()
    {
        var session = _session!;
        if (session.Length >= session.Capacity)
        {
            session.Cache.Length = PromptLength;
        }
        session.Forward(_token, _logits);
        int next = TensorPrimitives.IndexOfMax<float>(_logits);
        _token[0] = next;
        return next;
    }

    [GlobalCleanup]
    public void Dispose()
    {
        _session?.Dispose();
        _model?.Dispose();
        _session = null;
        _model = null;
        GC.SuppressFinalize(this);
    }
}
