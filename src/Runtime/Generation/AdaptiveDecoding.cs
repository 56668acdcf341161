using KernelLM.Runtime.Sampling;
using KernelLM.Runtime.Signals;

namespace KernelLM.Runtime.Generation;

/// <summary>
/// AdaDec-style adaptive decoding (docs/adaptive-decoding.md): greedy where the next-token distribution's entropy is
/// below <see cref="Threshold"/>; at or above it, the top <see cref="Beams"/> candidates are each extended greedily
/// for up to <see cref="Lookahead"/> tokens (stopping at EOS) and the candidate whose own log-prob and rollout
/// log-probs have the best mean is taken.
/// </summary>
public sealed record AdaptiveDecodingOptions
{
    public const int DefaultBeams = 3;
    public const int DefaultLookahead = 5;
    public const int MaxLookahead = 64;

    /// <summary>Entropy threshold in nats (0 = look ahead at every step).</summary>
    public float Threshold { get; init; }

    /// <summary>Candidates compared when the entropy is high: 2..<see cref="VocabStats.MaxTopK"/>.</summary>
    public int Beams { get; init; } = DefaultBeams;

    /// <summary>Greedy tokens each candidate is extended by: 1..<see cref="MaxLookahead"/>.</summary>
    public int Lookahead { get; init; } = DefaultLookahead;

    public void Validate()
    {
        if (!float.IsFinite(Threshold) || Threshold < 0)
        {
            throw new InvalidParameterException("adaptive-decoding threshold", $"{Threshold} (must be a finite entropy >= 0 nats)");
        }
        if (Beams < 2 || Beams > VocabStats.MaxTopK)
        {
            throw new InvalidParameterException("adaptive-decoding beams", $"{Beams} (must be 2..{VocabStats.MaxTopK})");
        }
        if (Lookahead < 1 || Lookahead > MaxLookahead)
        {
            throw new InvalidParameterException("adaptive-decoding lookahead", $"{Lookahead} (must be 1..{MaxLookahead})");
        }
    }
}

/// <summary>What adaptive decoding did during one generation (complete when its stream has ended).</summary>
public sealed class AdaptiveDecodingStats
{
    /// <summary>Tokens chosen (EOS included).</summary>
    public int Steps { get; internal set; }

    /// <summary>Steps whose entropy reached the threshold, so that the candidates were rolled out.</summary>
    public int LookaheadSteps { get; internal set; }

    /// <summary>Lookahead steps that chose another token than the greedy one.</summary>
    public int ChangedTokens { get; internal set; }

    /// <summary>Forward passes of the rollouts (each one token, all rolled back).</summary>
    public int RolloutForwards { get; internal set; }
}

/// <summary>
/// The token choice of adaptive decoding over one session. Per step: the fed tokens run through the session, the
/// fused vocabulary reduction gives the entropy and the top candidates (on the session's device when it samples
/// there: <see cref="IDeviceSampler"/> with greedy options, only the numbers come back). When the entropy reaches the
/// threshold, each candidate forks the KV cache at its current length, runs one forward pass per rollout token and
/// is rolled back with <see cref="ISessionRollback.Truncate"/>: the prefix is never recomputed and the session ends
/// the step exactly as a plain decode that chose the same token. Buffers are allocated once; a step allocates nothing.
/// </summary>
public sealed class AdaptiveDecoder
{
    private readonly IDecoderSession _session;
    private readonly ISessionRollback _rollback;
    private readonly IDeviceSampler? _device;
    private readonly AdaptiveDecodingOptions _options;
    private readonly IReadOnlyList<int> _eos;
    private readonly float[] _scratch;      // [vocab] rollout logits (host path)
    private readonly float[] _stats = new float[VocabStats.FieldCount];
    private readonly float[] _rolloutStats = new float[VocabStats.FieldCount];
    private readonly int[] _topIds = new int[VocabStats.MaxTopK];
    private readonly float[] _topLogProbs = new float[VocabStats.MaxTopK];
    private readonly int[] _candidates;
    private readonly float[] _candidateLogProbs;
    private readonly int[] _rolloutId = new int[1];
    private readonly float[] _rolloutLogProb = new float[1];
    private readonly int[] _single = new int[1];

    /// <param name="session">Must implement <see cref="ISessionRollback"/>.</param>
    /// <param name="onDevice">Use the session's <see cref="IDeviceSampler"/> (it must be able to sample).</param>
    public AdaptiveDecoder(IDecoderSession session, AdaptiveDecodingOptions options, IReadOnlyList<int> eosTokenIds, bool onDevice)
    {
        ArgumentNullException.ThrowIfNull(session);
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(eosTokenIds);
        options.Validate();
        _rollback = session as ISessionRollback
            ?? throw new InvalidParameterException("adaptive-decoding", $"the lookahead needs a session that can roll back its KV cache; {session.GetType().Name} cannot");
        if (onDevice)
        {
            _device = session as IDeviceSampler;
            if (_device is not { CanSample: true })
            {
                throw new InvalidOperationException($"{session.GetType().Name} cannot choose tokens on its device");
            }
        }
        _session = session;
        _options = options;
        _eos = eosTokenIds;
        _scratch = onDevice ? [] : new float[session.VocabularySize];
        _candidates = new int[options.Beams];
        _candidateLogProbs = new float[options.Beams];
    }

    public AdaptiveDecodingStats Stats { get; } = new();

    /// <summary>
    /// Host path: runs <paramref name="feed"/>, leaves the step's raw logits in <paramref name="logits"/> ([vocab])
    /// and returns the chosen token with its log-prob under them.
    /// </summary>
    public int Step(ReadOnlySpan<int> feed, Span<float> logits, out float logProbability)
    {
        int beams = _options.Beams;
        _session.Forward(feed, logits);
        VocabStats.ReduceRow(logits[.._session.VocabularySize], -1, default, beams, _stats, _topIds.AsSpan(0, beams), _topLogProbs.AsSpan(0, beams));
        return Decide(out logProbability);
    }

    /// <summary>
    /// Device path: runs <paramref name="feed"/> on the device and fills <paramref name="stats"/> [FieldCount] and the
    /// top alternatives (as many as <paramref name="topIds"/> holds) for the step's raw distribution and the chosen
    /// token, as <see cref="IDeviceSampler.ForwardSample"/> does. Returns the chosen token.
    /// </summary>
    public int StepOnDevice(ReadOnlySpan<int> feed, ulong seed, Span<float> stats, Span<int> topIds, Span<float> topLogProbs)
    {
        if (_device is null)
        {
            throw new InvalidOperationException("this decoder was made for the host path");
        }
        int topK = Math.Max(_options.Beams, topIds.Length);
        _device.ForwardSample(feed, SamplingOptions.Greedy, seed, topK, _stats, _topIds.AsSpan(0, topK), _topLogProbs.AsSpan(0, topK));
        // The signals' top list is read before the rollouts overwrite the device buffers (ours are host copies).
        _topIds.AsSpan(0, topIds.Length).CopyTo(topIds);
        _topLogProbs.AsSpan(0, topLogProbs.Length).CopyTo(topLogProbs);
        int token = Decide(out float logProbability);
        _stats.CopyTo(stats);
        stats[(int)VocabStatsField.TokenLogProb] = logProbability;
        return token;
    }

    /// <summary>Greedy below the threshold (or when no rollout fits in the context); otherwise the lookahead.
    /// <c>_stats</c>, <c>_topIds</c> and <c>_topLogProbs</c> hold the step's reduction.</summary>
    private int Decide(out float logProbability)
    {
        Stats.Steps++;
        logProbability = _topLogProbs[0];
        float entropy = _stats[(int)VocabStatsField.Entropy];
        if (!(entropy >= _options.Threshold) || _session.Length >= _session.Capacity)
        {
            return _topIds[0];
        }
        Stats.LookaheadSteps++;
        int count = 0;
        for (int b = 0; b < _options.Beams && _topIds[b] >= 0; b++)
        {
            _candidates[count] = _topIds[b];
            _candidateLogProbs[count++] = _topLogProbs[b];
        }
        int fork = _session.Length;
        int best = 0;
        double bestScore = double.NegativeInfinity;
        for (int b = 0; b < count; b++)
        {
            double score = Rollout(_candidates[b], _candidateLogProbs[b]);
            _rollback.Truncate(fork);
            // Strictly better only: a tie keeps the more likely candidate (the list is sorted by probability).
            if (score > bestScore)
            {
                bestScore = score;
                best = b;
            }
        }
        if (best != 0)
        {
            Stats.ChangedTokens++;
        }
        logProbability = _candidateLogProbs[best];
        return _candidates[best];
    }

    /// <summary>Mean log-prob of <paramref name="candidate"/> and up to Lookahead greedy tokens after it (an EOS ends
    /// the rollout and counts; so does a full context).</summary>
    private double Rollout(int candidate, float logProbability)
    {
        double sum = logProbability;
        int count = 1;
        int token = candidate;
        for (int i = 0; i < _options.Lookahead && !IsEos(token) && _session.Length < _session.Capacity; i++)
        {
            _single[0] = token;
            token = GreedyNext(_single, out float next);
            sum += next;
            count++;
        }
        return sum / count;
    }

    private int GreedyNext(int[] feed, out float logProbability)
    {
        Stats.RolloutForwards++;
        if (_device is not null)
        {
            int token = _device.ForwardSample(feed, SamplingOptions.Greedy, 0, 0, _rolloutStats, default, default);
            logProbability = _rolloutStats[(int)VocabStatsField.TokenLogProb];
            return token;
        }
        _session.Forward(feed, _scratch);
        VocabStats.ReduceRow(_scratch, -1, default, 1, _rolloutStats, _rolloutId, _rolloutLogProb);
        logProbability = _rolloutLogProb[0];
        return _rolloutId[0];
    }

    private bool IsEos(int token)
    {
        for (int i = 0; i < _eos.Count; i++)
        {
            if (_eos[i] == token)
            {
                return true;
            }
        }
        return false;
    }
}
