using System.Numerics.Tensors;
using BenchmarkDotNet.Attributes;
using KernelLM.Models.Llama;
using KernelLM.Runtime.Composition;
using KernelLM.Runtime.Generation;

namespace KernelLM.Bench;

/// <summary>
/// What composing models costs beyond the members' own forward passes (docs/composition.md). One op = one greedy decode
/// step of the embedded tiny-stories model on 1 thread, as <see cref="DecodeBenchmark"/> does it, with
/// <see cref="Members"/> = 1: the model's own session; 2 or 3: a <see cref="ComposedSession"/> of that many sessions of
/// the same model (weights 1, 0.5, -0.25: every member runs its full forward pass), whose step is N forward passes plus
/// the sum of their rows (<see cref="LogitSum"/>, the CPU path). Overhead = time(N) - N x time(1). The sessions are
/// rewound to just after the prompt when full, as in <see cref="DecodeBenchmark"/>.
/// </summary>
public class CompositionBenchmark : IDisposable
{
    private const int ContextLength = 512;
    private const int PromptLength = 64;
    private static readonly float[] s_weights = [1f, 0.5f, -0.25f];

    private LlamaModel? _model;
    private readonly List<LlamaSession> _sessions = [];
    private IDecoderSession? _decoder;
    private float[] _logits = [];
    private readonly int[] _token = new int[1];

    [Params(1, 2, 3)]
    public int Members { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        _model = EmbeddedModel.Load(1, ContextLength);
        for (int m = 0; m < Members; m++)
        {
            _sessions.Add(_model.CreateSession());
        }
        _decoder = Members == 1
            ? _sessions[0]
            : new ComposedSession([.. _sessions.Select((s, m) => new ComposedMember(s, s_weights[m]))], _model.Config.VocabularySize);
        _logits = new float[_model.Config.VocabularySize];
        _decoder.Forward(EmbeddedModel.PromptTokens(PromptLength), _logits);
        _token[0] = TensorPrimitives.IndexOfMax<float>(_logits);
    }

    [Benchmark(Description = "decode 1 token (composed)")]
    public int DecodeToken()
    {
        if (_decoder!.Length >= _decoder.Capacity)
        {
            foreach (var session in _sessions)
            {
                session.Cache.Length = PromptLength;
            }
        }
        _decoder.Forward(_token, _logits);
        int next = TensorPrimitives.IndexOfMax<float>(_logits);
        _token[0] = next;
        return next;
    }

    [GlobalCleanup]
    public void Dispose()
    {
        if (_decoder is ComposedSession composed)
        {
            composed.Dispose();
        }
        _sessions.ForEach(s => s.Dispose());
        _sessions.Clear();
        _model?.Dispose();
        _model = null;
        _decoder = null;
        GC.SuppressFinalize(this);
    }
}
