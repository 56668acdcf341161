using BenchmarkDotNet.Attributes;
using KernelLM.Models.Llama;

namespace KernelLM.Bench;

/// <summary>
/// Prompt processing on the embedded tiny-stories model: one op = Reset, then one
/// <see cref="LlamaSession.Forward"/> of a <see cref="PromptLength"/>-token prompt (the first tokens of the
/// model's sample stories; one prefill chunk, logits of the last position). Column: Tokens/s.
/// </summary>
public class PrefillBenchmark : IDisposable
{
    public const int PromptLength = 128;

    private LlamaModel? _model;
    private LlamaSession? _session;
    private int[] _prompt = [];
    private float[] _logits = [];

    [Params(1, 2)]
    public int Threads { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        _model = EmbeddedModel.Load(Threads, contextLength: 256);
        _session = _model.CreateSession();
        _prompt = EmbeddedModel.PromptTokens(PromptLength);
        _logits = new float[_model.Config.VocabularySize];
    }

    [Benchmark(Description = "prefill 128 tokens")]
    public void Prefill()
    {
        var session = _session!;
        session.Reset();
        session.Forward(_prompt, _logits);
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
