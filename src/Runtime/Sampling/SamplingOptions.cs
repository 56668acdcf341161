namespace KernelLM.Runtime.Sampling;

/// <summary>
/// How the next token is chosen from the logits. Applied in Hugging Face's order: repetition penalty,
/// temperature, top-k, top-p, min-p, then a draw. Temperature 0 means greedy (argmax after the penalty).
/// </summary>
public sealed record SamplingOptions
{
    public static SamplingOptions Greedy { get; } = new() { Temperature = 0 };

    /// <summary>Logits are divided by it; 0 = greedy.</summary>
    public float Temperature { get; init; } = 0.8f;

    /// <summary>Keep the k most likely tokens; 0 = off.</summary>
    public int TopK { get; init; } = 40;

    /// <summary>Keep the smallest set of most likely tokens whose probability reaches p; 1 = off.</summary>
    public float TopP { get; init; } = 0.95f;

    /// <summary>Drop tokens whose probability is below min_p x the top token's; 0 = off.</summary>
    public float MinP { get; init; } = 0.05f;

    /// <summary>CTRL-style penalty on tokens already in the sequence (prompt included): a positive logit is
    /// divided by it, a negative one multiplied; 1 = off.</summary>
    public float RepetitionPenalty { get; init; } = 1f;

    /// <summary>Seed of the sampler's random generator: same seed, same output. Null = random.</summary>
    public int? Seed { get; init; }

    public bool IsGreedy => Temperature == 0;

    /// <summary>Throws <see cref="InvalidParameterException"/> naming the first invalid parameter.</summary>
    public void Validate()
    {
        if (!float.IsFinite(Temperature) || Temperature < 0)
        {
            throw new InvalidParameterException("temperature", $"{Temperature} (must be a finite number >= 0; 0 means greedy)");
        }
        if (TopK < 0)
        {
            throw new InvalidParameterException("top-k", $"{TopK} (must be >= 0; 0 disables it)");
        }
        if (!(TopP > 0 && TopP <= 1))
        {
            throw new InvalidParameterException("top-p", $"{TopP} (must be in (0, 1]; 1 disables it)");
        }
        if (!(MinP >= 0 && MinP < 1))
        {
            throw new InvalidParameterException("min-p", $"{MinP} (must be in [0, 1); 0 disables it)");
        }
        if (!float.IsFinite(RepetitionPenalty) || RepetitionPenalty <= 0)
        {
            throw new InvalidParameterException("repetition-penalty", $"{RepetitionPenalty} (must be a finite number > 0; 1 disables it)");
        }
    }
}
