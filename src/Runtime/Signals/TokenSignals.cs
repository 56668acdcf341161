namespace KernelLM.Runtime.Signals;

/// <summary>Opt-in per-token signals for generation: what to compute for each generated token.</summary>
public sealed record TokenSignalOptions
{
    /// <summary>Alternatives reported per token (0..<see cref="VocabStats.MaxTopK"/>).</summary>
    public int TopK { get; init; } = 5;

    public void Validate()
    {
        if ((uint)TopK > VocabStats.MaxTopK)
        {
            throw new InvalidParameterException("signals top-k", $"{TopK} (must be 0..{VocabStats.MaxTopK})");
        }
    }
}

/// <summary>A candidate token and its log-prob under the distribution the token was drawn from.</summary>
public readonly record struct TokenAlternative(int Id, float LogProbability);

/// <summary>
/// The numbers of the next-token distribution one generated token was drawn from (its model's logits before
/// penalties and temperature; docs/token-signals.md): the chosen token's log-prob, the entropy (nats), the
/// excess kurtosis of the probabilities, the top-1/top-2 probability margin and the top alternatives.
/// </summary>
public sealed class TokenSignals
{
    public TokenSignals(int token, float logProbability, float entropy, float kurtosis, float margin, float maxLogit, float logSumExp,
        IReadOnlyList<TokenAlternative> top)
    {
        Token = token;
        LogProbability = logProbability;
        Entropy = entropy;
        Kurtosis = kurtosis;
        Margin = margin;
        MaxLogit = maxLogit;
        LogSumExp = logSumExp;
        Top = top;
    }

    public int Token { get; }
    public float LogProbability { get; }
    public float Probability => MathF.Exp(LogProbability);
    public float Entropy { get; }
    public float Kurtosis { get; }
    public float Margin { get; }
    public float MaxLogit { get; }
    public float LogSumExp { get; }
    public IReadOnlyList<TokenAlternative> Top { get; }

    /// <summary>Reads one row of the reduction's output (<see cref="VocabStats"/> layout) for the chosen token.</summary>
    public static TokenSignals FromStats(int token, ReadOnlySpan<float> stats, ReadOnlySpan<int> topIds, ReadOnlySpan<float> topLogProbs)
    {
        var top = new List<TokenAlternative>(topIds.Length);
        for (int i = 0; i < topIds.Length && topIds[i] >= 0; i++)
        {
            top.Add(new TokenAlternative(topIds[i], topLogProbs[i]));
        }
        return new TokenSignals(token, stats[(int)VocabStatsField.TokenLogProb], stats[(int)VocabStatsField.Entropy],
            stats[(int)VocabStatsField.Kurtosis], stats[(int)VocabStatsField.Margin], stats[(int)VocabStatsField.MaxLogit],
            stats[(int)VocabStatsField.LogSumExp], top);
    }
}

/// <summary>
/// Sequence-level uncertainty of a generation (docs/token-signals.md): the geometric mean of the chosen tokens'
/// probabilities exp(mean log p), their arithmetic mean, and the mean kurtosis and entropy of the distributions.
/// </summary>
public sealed record UncertaintySummary(int TokenCount, double GeometricMeanProbability, double ArithmeticMeanProbability,
    double MeanKurtosis, double MeanEntropy)
{
    public static UncertaintySummary From(IEnumerable<TokenSignals> tokens)
    {
        ArgumentNullException.ThrowIfNull(tokens);
        var accumulator = new UncertaintyAccumulator();
        foreach (var token in tokens)
        {
            accumulator.Add(token);
        }
        return accumulator.Summary;
    }
}

/// <summary>Running sums behind <see cref="UncertaintySummary"/> (fp64).</summary>
public sealed class UncertaintyAccumulator
{
    private int _count;
    private double _logProbabilities;
    private double _probabilities;
    private double _kurtosis;
    private double _entropy;

    public void Add(TokenSignals token)
    {
        ArgumentNullException.ThrowIfNull(token);
        _count++;
        _logProbabilities += token.LogProbability;
        _probabilities += Math.Exp(token.LogProbability);
        _kurtosis += token.Kurtosis;
        _entropy += token.Entropy;
    }

    /// <summary>NaN figures while no token has been added.</summary>
    public UncertaintySummary Summary => _count == 0
        ? new UncertaintySummary(0, double.NaN, double.NaN, double.NaN, double.NaN)
        : new UncertaintySummary(_count, Math.Exp(_logProbabilities / _count), _probabilities / _count, _kurtosis / _count, _entropy / _count);
}
