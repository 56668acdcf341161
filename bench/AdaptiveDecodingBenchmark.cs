using System.Numerics.Tensors;
using BenchmarkDotNet.Attributes;
using KernelLM.Models.Llama;
using KernelLM.Runtime.Generation;

namespace KernelLM.Bench;

/// <summary>
/// The cost per generated token of adaptive decoding and of small/large routing on the embedded tiny-stories model (CPU),
/// against plain greedy decode at the same positions. One op = one chosen token:
///   greedy            LlamaSession.Forward of the last token + argmax (as DecodeBenchmark)
///   adadec-never      AdaptiveDecoder.Step with a threshold no entropy reaches: the fused reduction's overhead only
///   adadec-calibrated AdaptiveDecoder.Step, threshold <see cref="CalibratedThreshold"/> (calibrate-entropy on the model's
///                     sample stories), beams 3, lookahead 5: the lookahead runs where the entropy reaches it
///   adadec-always     threshold 0: every step rolls out 3 candidates x up to 5 tokens (the worst case)
///   routed-calibrated RoutedSession over two sessions of the model (small = large, so the text is greedy's), threshold
///                     <see cref="CalibratedThreshold"/>: the entropy per step plus the large session's catch-up prefills
/// Setup prefills a 64-token prompt into a 1024-token cache; when fewer than 64 positions are left the sessions go back to
/// just after the prompt (Truncate; the routed pair is Reset and re-prefilled, 64 tokens every ~900 ops, a few per cent).
/// </summary>
public class AdaptiveDecodingBenchmark : IDisposable
{
    public const int ContextLength = 1024;
    public const int PromptLength = 64;

    /// <summary>`kernellm calibrate-entropy` on models/tiny-stories/corpus/sample_stories.txt (50 stories): 1.0383 nats.</summary>
    public const float CalibratedThreshold = 1.0383f;

    private LlamaModel? _model;
    private LlamaSession? _session;
    private LlamaSession? _large;
    private RoutedSession? _routed;
    private AdaptiveDecoder? _decoder;
    private int[] _prompt = [];
    private float[] _logits = [];
    private readonly int[] _token = new int[1];

    [Params("greedy", "adadec-never", "adadec-calibrated", "adadec-always", "routed-calibrated")]
    public string Mode { get; set; } = "greedy";

    [Params(1)]
    public int Threads { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        _model = EmbeddedModel.Load(Threads, ContextLength);
        _session = _model.CreateSession();
        _logits = new float[_model.Config.VocabularySize];
        _prompt = EmbeddedModel.PromptTokens(PromptLength);
        float threshold = Mode switch
        {
            "adadec-never" => float.MaxValue,
            "adadec-always" => 0,
            _ => CalibratedThreshold,
        };
        if (Mode.StartsWith("adadec", StringComparison.Ordinal))
        {
            _decoder = new AdaptiveDecoder(_session, new AdaptiveDecodingOptions { Threshold = threshold }, _model.Config.EosTokenIds, onDevice: false);
        }
        if (Mode == "routed-calibrated")
        {
            _large = _model.CreateSession();
            _routed = new RoutedSession(_session, _large, new RoutingOptions { EntropyThreshold = threshold });
        }
        Session.Forward(_prompt, _logits);
        _token[0] = TensorPrimitives.IndexOfMax<float>(_logits);
    }

    private IDecoderSession Session => (IDecoderSession?)_routed ?? _session!;

    [Benchmark(Description = "one token")]
    public int Token()
    {
        var session = Session;
        if (session.Length > session.Capacity - PromptLength)
        {
            Rewind();
        }
        if (_decoder is not null)
        {
            _token[0] = _decoder.Step(_token, _logits, out _);
            return _token[0];
        }
        session.Forward(_token, _logits);
        _token[0] = TensorPrimitives.IndexOfMax<float>(_logits);
        return _token[0];
    }

    private void Rewind()
    {
        if (_routed is not null)
        {
            _routed.Reset();
            _routed.Forward(_prompt, _logits);
            return;
        }
        _session!.Truncate(PromptLength);
    }

    /// <summary>What the adaptive modes did per op, printed after the run (lookahead share, rollout passes per token).</summary>
    [GlobalCleanup]
    public void Dispose()
    {
        if (_decoder is { Stats: { Steps: > 0 } stats })
        {
            Console.WriteLine($"// {Mode}: lookahead at {stats.LookaheadSteps} of {stats.Steps} steps ({100.0 * stats.LookaheadSteps / stats.Steps:F1}%), "
                + $"{(double)stats.RolloutForwards / stats.Steps:F2} rollout passes per token, {stats.ChangedTokens} tokens changed");
        }
        if (_routed is { Stats: var routing })
        {
            Console.WriteLine($"// {Mode}: small {routing.SmallTokens}, large {routing.LargeTokens} tokens since the last reset, {routing.CatchUpTokens} caught up");
        }
        _routed?.Dispose();
        _large?.Dispose();
        _session?.Dispose();
        _model?.Dispose();
        _routed = null;
        _large = null;
        _session = null;
        _model = null;
        GC.SuppressFinalize(this);
    }
}
