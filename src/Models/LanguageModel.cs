using System.Runtime.CompilerServices;
using KernelLM.Models.Llama;
using KernelLM.Models.Scoring;
using KernelLM.Models.Tokenization;
using KernelLM.Runtime;
using KernelLM.Runtime.Generation;

namespace KernelLM.Models;

/// <summary>
/// The embeddable engine: load a model folder once, then generate or score many times. One sequence state
/// is allocated at load and reused; concurrent requests are served one after another. Dispose frees the
/// memory map and every buffer.
/// </summary>
public sealed class LanguageModel : IDisposable
{
    private static long s_loads;

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
    /// for every position i >= 1, log p(token_i | tokens before i), the entropy, kurtosis and margin of that
    /// distribution (<see cref="Scorer"/>, which also scores against a reference model).
    /// </summary>
    public IReadOnlyList<TokenScore> Score(string text) => Score(_tokenizer.Encode(text));

    public IReadOnlyList<TokenScore> Score(int[] ids)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        using var scorer = new Scorer(this);
        return scorer.Score(ids).Positions;
    }

    internal HfTokenizer HfTokenizer => _tokenizer;

    /// <summary>
    /// Exclusive use of this model's sequence state until the lease is disposed (generation waits meanwhile).
    /// Leases on two models are taken in load order (<see cref="LoadOrder"/>), so that two scorers holding the
    /// same pair in opposite roles cannot deadlock.
    /// </summary>
    internal SessionLease LeaseSession()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        _gate.Wait();
        return new SessionLease(_session, _gate);
    }

    internal long LoadOrder { get; } = Interlocked.Increment(ref s_loads);

    internal readonly struct SessionLease(LlamaSession session, SemaphoreSlim gate) : IDisposable
    {
        public LlamaSession Session { get; } = session;

        public void Dispose() => gate.Release();
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
