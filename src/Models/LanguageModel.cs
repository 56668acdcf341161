using System.Runtime.CompilerServices;
using KernelLM.Models.Llama;
using KernelLM.Models.Tokenization;
using KernelLM.Runtime;
using KernelLM.Runtime.Generation;
using KernelLM.Runtime.Sampling;

namespace KernelLM.Models;

/// <summary>log p(token | tokens before it) and the entropy (nats) of that predicted distribution.</summary>
public readonly record struct TokenScore(int Position, int Token, float LogProbability, float Entropy);

/// <summary>
/// The embeddable engine: load a model folder once, then generate or score many times. One sequence state
/// is allocated at load and reused; concurrent requests are served one after another. Dispose frees the
/// memory map and every buffer.
/// </summary>
public sealed class LanguageModel : IDisposable
{
    private readonly SemaphoreSlim _gate = new(1, 1);
    private readonly LlamaSession _session;
    private readonly HfTokenizer _tokenizer;
    private bool _disposed;

    private LanguageModel(LlamaModel model, HfTokenizer tokenizer)
    {
        Model = model;
        _tokenizer = tokenizer;
        _session = model.CreateSession();
    }

    public LlamaModel Model { get; }
    public ModelConfig Config => Model.Config;
    public ITextTokenizer Tokenizer => _tokenizer;
    public string Directory => Model.Directory;
    public string DeviceName => $"cpu ({Model.Device.ThreadCount} threads)";

    /// <summary>Bytes of the sequence state (KV cache + activations) allocated at load.</summary>
    public long SessionBytes => _session.ByteLength;

    /// <summary>The embedded default model (tiny-stories) shipped next to the executable.</summary>
    public static string DefaultModelDirectory => Path.Combine(AppContext.BaseDirectory, "models", "tiny-stories");

    public static LanguageModel Load(string directory, ModelLoadOptions? options = null)
    {
        var model = LlamaModel.Load(directory, options);
        HfTokenizer? tokenizer = null;
        try
        {
            tokenizer = HfTokenizer.Load(directory, model.Config.BosTokenId, model.Config.EosTokenIds);
            return new LanguageModel(model, tokenizer);
        }
        catch
        {
            tokenizer?.Dispose();
            model.Dispose();
            throw;
        }
    }

    public int[] Encode(string text) => _tokenizer.Encode(text);

    /// <summary>Streams generated tokens; <paramref name="stats"/> (optional) is complete when the stream ends.</summary>
    public async IAsyncEnumerable<GeneratedToken> GenerateAsync(string prompt, GenerationOptions? options = null, GenerationStats? stats = null,
        [EnumeratorCancellation] CancellationToken cancellation = default)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        options ??= new GenerationOptions();
        options.Validate();
        int[] ids = _tokenizer.Encode(prompt);
        await _gate.WaitAsync(cancellation);
        try
        {
            foreach (var token in Generator.Run(_session, _tokenizer, ids, options, stats ?? new GenerationStats(), cancellation))
            {
                yield return token;
                await Task.Yield();
            }
        }
        finally
        {
            _gate.Release();
        }
    }

    /// <summary>Synchronous generation (CLI, tests); same semantics as <see cref="GenerateAsync"/>.</summary>
    public IEnumerable<GeneratedToken> Generate(string prompt, GenerationOptions? options = null, GenerationStats? stats = null,
        CancellationToken cancellation = default)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        options ??= new GenerationOptions();
        options.Validate();
        int[] ids = _tokenizer.Encode(prompt);
        return Locked(Generator.Run(_session, _tokenizer, ids, options, stats ?? new GenerationStats(), cancellation), cancellation);
    }

    private IEnumerable<GeneratedToken> Locked(IEnumerable<GeneratedToken> tokens, CancellationToken cancellation)
    {
        _gate.Wait(cancellation);
        try
        {
            foreach (var token in tokens)
            {
                yield return token;
            }
        }
        finally
        {
            _gate.Release();
        }
    }

    /// <summary>
    /// Teacher-forced scores of <paramref name="text"/> (tokenized with BOS as the tokenizer config says):
    /// for every position i >= 1, log p(token_i | tokens before i) and the entropy of that distribution.
    /// </summary>
    public IReadOnlyList<TokenScore> Score(string text) => Score(_tokenizer.Encode(text));

    public IReadOnlyList<TokenScore> Score(int[] ids)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentNullException.ThrowIfNull(ids);
        if (ids.Length < 2)
        {
            throw new InvalidParameterException("text", $"encodes to {ids.Length} token(s); scoring needs at least 2");
        }
        if (ids.Length > _session.Capacity)
        {
            throw new ContextLengthException($"the text is {ids.Length} tokens; the context holds {_session.Capacity}");
        }
        int vocabulary = Config.VocabularySize;
        var scores = new TokenScore[ids.Length - 1];
        _gate.Wait();
        try
        {
            _session.Reset();
            int chunk = Math.Max(1, Model.Options.PrefillChunk);
            var logits = new float[(long)chunk * vocabulary];
            for (int start = 0; start < ids.Length - 1; start += chunk)
            {
                int count = Math.Min(chunk, ids.Length - 1 - start);
                _session.Forward(ids.AsSpan(start, count), logits, allPositions: true);
                for (int t = 0; t < count; t++)
                {
                    var row = logits.AsSpan(t * vocabulary, vocabulary);
                    int position = start + t + 1;
                    scores[position - 1] = new TokenScore(position, ids[position], Sampler.LogProbability(row, ids[position]), Entropy(row));
                }
            }
        }
        finally
        {
            _gate.Release();
        }
        return scores;
    }

    /// <summary>H = -sum p log p of softmax(logits), in nats, fp64 accumulation.</summary>
    public static float Entropy(ReadOnlySpan<float> logits)
    {
        double logNormaliser = Sampler.LogSumExp(logits);
        double entropy = 0;
        foreach (float logit in logits)
        {
            double logP = logit - logNormaliser;
            if (!double.IsNegativeInfinity(logP))
            {
                entropy -= Math.Exp(logP) * logP;
            }
        }
        return (float)entropy;
    }

    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }
        _disposed = true;
        _session.Dispose();
        _tokenizer.Dispose();
        Model.Dispose();
        _gate.Dispose();
    }
}
