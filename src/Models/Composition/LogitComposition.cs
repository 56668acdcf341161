using System.Runtime.CompilerServices;
using KernelLM.Models.Scoring;
using KernelLM.Runtime;
using KernelLM.Runtime.Composition;
using KernelLM.Runtime.Generation;

namespace KernelLM.Models.Composition;

/// <summary>
/// One model of a <see cref="LogitComposition"/>: its weight in the sum of logits, and optionally its own prompt, run in
/// place of the request's prompt (guidance's unconditional sequence); the generated tokens are fed to every member.
/// </summary>
public sealed record CompositionMember(LanguageModel Model, float Weight, string? Prompt = null);

/// <summary>
/// Decoding from a weighted sum of several models' next-token logits (docs/composition.md), as an object a service keeps
/// and reuses across requests: plug-in modules on a frozen backbone (<see cref="Sum"/>: backbone + sum of w_m module_m),
/// classifier-free guidance (<see cref="Guidance"/>: uncond + s (cond - uncond)), contrastive decoding
/// (<see cref="Contrastive"/>: log p_expert - log p_amateur over the expert's plausible set). Each member runs in its own
/// sequence state, created here once on the member model's weights and device; the members step in lockstep and their
/// logits are summed by <see cref="ComposedSession"/> (on the device when all members share one CUDA device), and the
/// sampler, temperature, token signals and reports all see the composed distribution. Requests are served one after
/// another. The member models must share the backbone's tokenizer (checked like <c>score --reference</c>; LM heads may
/// differ only in padding rows past the tokenizer's vocabulary, which are left out) and must outlive the composition.
/// </summary>
public sealed class LogitComposition : IDisposable
{
    private readonly SemaphoreSlim _gate = new(1, 1);
    private readonly IDecoderSession[] _sessions;
    private readonly ComposedSession _session;
    private bool _disposed;

    /// <param name="members">Member 0 is the backbone (its tokenizer encodes prompts and decodes the output; with a
    /// plausibility cut, the expert).</param>
    /// <param name="plausibilityAlpha">0, or in (0, 1]: keep only the tokens with p_0 &gt;= alpha max p_0.</param>
    public LogitComposition(IReadOnlyList<CompositionMember> members, float plausibilityAlpha = 0)
    {
        ArgumentNullException.ThrowIfNull(members);
        if (members.Count == 0)
        {
            throw new InvalidParameterException("compose", "a composition needs at least one member");
        }
        Members = [.. members];
        var backbone = Members[0].Model ?? throw new ArgumentNullException(nameof(members), "member 0 has no model");
        int width = backbone.Config.VocabularySize;
        foreach (var member in Members.Skip(1))
        {
            ArgumentNullException.ThrowIfNull(member?.Model, nameof(members));
            if (!ReferenceEquals(member.Model, backbone))
            {
                width = Math.Min(width, Scorer.CheckReference(backbone, member.Model, "compose"));
            }
        }
        var sessions = new List<IDecoderSession>(Members.Count);
        try
        {
            var composed = new ComposedMember[Members.Count];
            for (int m = 0; m < Members.Count; m++)
            {
                var member = Members[m];
                int[]? prompt = member.Prompt is null ? null : member.Model.Encode(member.Prompt);
                if (prompt is { Length: 0 })
                {
                    throw new InvalidParameterException("compose", $"member {m}'s own prompt \"{member.Prompt}\" encodes to no tokens (and the tokenizer adds no BOS)");
                }
                sessions.Add(member.Model.CreateSession());
                composed[m] = new ComposedMember(sessions[m], member.Weight, prompt);
            }
            _session = new ComposedSession(composed, width, plausibilityAlpha);
        }
        catch
        {
            sessions.ForEach(s => s.Dispose());
            throw;
        }
        _sessions = [.. sessions];
    }

    /// <summary>backbone + sum_m w_m module_m (UniR-style plug-in modules; weights may be negative).</summary>
    public static LogitComposition Sum(LanguageModel backbone, params IEnumerable<(LanguageModel Module, float Weight)> modules)
    {
        ArgumentNullException.ThrowIfNull(backbone);
        ArgumentNullException.ThrowIfNull(modules);
        return new LogitComposition([new CompositionMember(backbone, 1), .. modules.Select(m => new CompositionMember(m.Module, m.Weight))]);
    }

    /// <summary>
    /// Classifier-free guidance with two sequences of <paramref name="model"/>: the conditional one (the request's prompt)
    /// and the unconditional one (<paramref name="negativePrompt"/>), both continued with the generated tokens:
    /// uncond + s (cond - uncond) = s cond + (1 - s) uncond. Scale 1 is the conditional model alone.
    /// </summary>
    public static LogitComposition Guidance(LanguageModel model, string negativePrompt, float scale)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(negativePrompt);
        if (!float.IsFinite(scale))
        {
            throw new InvalidParameterException("guidance-scale", $"{scale} (must be a finite number)");
        }
        return new LogitComposition([new CompositionMember(model, scale), new CompositionMember(model, 1 - scale, negativePrompt)]);
    }

    /// <summary>
    /// Contrastive decoding (Li et al. 2023): score = log p_expert - log p_amateur over the plausible set
    /// {i : p_expert(i) &gt;= alpha max p_expert}, -inf elsewhere. (The weights 1 and -1 on the raw logits give the same
    /// distribution: the two log-sum-exps only shift the row.)
    /// </summary>
    public static LogitComposition Contrastive(LanguageModel expert, LanguageModel amateur, float alpha = 0.1f)
    {
        ArgumentNullException.ThrowIfNull(expert);
        ArgumentNullException.ThrowIfNull(amateur);
        if (!(alpha > 0 && alpha <= 1))
        {
            throw new InvalidParameterException("contrastive-alpha", $"{alpha} (must be in (0, 1])");
        }
        return new LogitComposition([new CompositionMember(expert, 1), new CompositionMember(amateur, -1)], alpha);
    }

    public IReadOnlyList<CompositionMember> Members { get; }

    /// <summary>Member 0: its tokenizer encodes the prompt and decodes the output.</summary>
    public LanguageModel Backbone => Members[0].Model;

    /// <summary>The composed decoder (for scoring a fixed text or driving the loop yourself; leased like a model's session).</summary>
    public IDecoderSession Session => _session;

    /// <summary>Whether the members' logits are summed on their CUDA device.</summary>
    public bool OnDevice => _session.OnDevice;

    /// <summary>Columns of the composed distribution (the shared vocabulary).</summary>
    public int VocabularySize => _session.VocabularySize;

    /// <summary>Streams tokens from the composed distribution; <paramref name="stats"/> is complete when the stream ends.</summary>
    public IEnumerable<GeneratedToken> Generate(string prompt, GenerationOptions? options = null, GenerationStats? stats = null,
        CancellationToken cancellation = default)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentNullException.ThrowIfNull(prompt);
        options ??= new GenerationOptions();
        options.Validate();
        int[] ids = Backbone.Encode(prompt);
        return Locked(Generator.Run(_session, Backbone.Tokenizer, ids, options, stats ?? new GenerationStats(), cancellation), cancellation);
    }

    /// <summary>The same as an async stream for services (cancellation between tokens).</summary>
    public async IAsyncEnumerable<GeneratedToken> GenerateAsync(string prompt, GenerationOptions? options = null, GenerationStats? stats = null,
        [EnumeratorCancellation] CancellationToken cancellation = default)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentNullException.ThrowIfNull(prompt);
        options ??= new GenerationOptions();
        options.Validate();
        int[] ids = Backbone.Encode(prompt);
        await _gate.WaitAsync(cancellation);
        try
        {
            foreach (var token in Generator.Run(_session, Backbone.Tokenizer, ids, options, stats ?? new GenerationStats(), cancellation))
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

    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }
        _disposed = true;
        _session.Dispose();
        foreach (var session in _sessions)
        {
            session.Dispose();
        }
        _gate.Dispose();
    }
}
