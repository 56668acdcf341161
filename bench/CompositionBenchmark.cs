using System.Numerics.Tensors;
using BenchmarkDotNet.Attributes;
using KernelLM.Models.Llama;
using KernelLM.Runtime.Composition;

namespace KernelLM.Bench;

/// <summary>
/// What composing models costs beyond the members' own forward passes (docs/composition.md). One op = one greedy decode
/// step of <see cref="Members"/> sessions of the embedded tiny-stories model on 1 thread (as <see cref="DecodeBenchmark"/>),
/// either <see cref="Composed"/> = false: the sessions stepped one after another, each into its own row (the members'
/// forward passes alone, the argmax of the first row chosen), or true: one <see cref="ComposedSession"/> over them (weights
/// 1, 0.5, -0.25), whose step is the same forward passes plus the sum of their rows (<see cref="LogitSum"/>, the CPU path)
/// and the argmax of the sum. Overhead = time(composed) - time(separate) at the same Members. The sessions are rewound to
/// just after the prompt when full, as in <see cref="DecodeBenchmark"/>.
/// </summary>
public class CompositionBenchmark : IDisposable
{
    private const int ContextLength = 512;
    private const int PromptLength = 64;
    private static readonly float[] s_weights = [1f, 0.5f, -0.25f];

    private LlamaModel? _model;
    private readonly List<LlamaSession> _sessions = [];
    private ComposedSession? _decoder;
    private float[] _logits = [];
    private float[][] _rows = [];
    private readonly int[] _token = new int[1];

    [Params(1, 2, 3)]
    public int Members { get; set; }

    [Params(false, true)]
    public bool Composed { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        _model = EmbeddedModel.Load(1, ContextLength);
        for (int m = 0; m < Members; m++)
        {
            _sessions.Add(_model.CreateSession());
        }
        _decoder = Composed
            ? new ComposedSession([.. _sessions.Select((s, m) => new ComposedMember(s, s_weights[m]))], _model.Config.VocabularySize)
            : null;
        _logits = new float[_model.Config.VocabularySize];
        _rows = [.. _sessions.Select(_ => new float[_logits.Length])];
        int[] prompt = EmbeddedModel.PromptTokens(PromptLength);
        if (_decoder is not null)
        {
            _decoder.Forward(prompt, _logits);
        }
        else
        {
            for (int m = 0; m < Members; m++)
            {
                _sessions[m].Forward(prompt, _rows[m]);
            }
            _logits = _rows[0];
        }
        _token[0] = TensorPrimitives.IndexOfMax<float>(_logits);
    }

    [Benchmark(Description = "decode 1 token x members")]
    public int DecodeToken()
    {
        if (_sessions[0].Length >= _sessions[0].Capacity)
        {
            foreach (var session in _sessions)
            {
                session.Cache.Length = PromptLength;
            }
        }
        if (_decoder is not null)
        {
            _decoder.Forward(_token, _logits);
        }
        else
        {
            for (int m = 0; m < _sessions.Count; m++)
            {
                _sessions[m].Forward(_token, _rows[m]);
            }
        }
        int next = TensorPrimitives.IndexOfMax<float>(_logits);
        _token[0] = next;
        return next;
    }

    [GlobalCleanup]
    public void Dispose()
    {
        _decoder?.Dispose();
        _sessions.ForEach(s => s.Dispose());
        _sessions.Clear();
        _model?.Dispose();
        _model = null;
        _decoder = null;
        GC.SuppressFinalize(this);
    }
}
