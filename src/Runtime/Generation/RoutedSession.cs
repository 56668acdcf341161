using KernelLM.Runtime.Sampling;
using KernelLM.Runtime.Signals;

namespace KernelLM.Runtime.Generation;

/// <summary>Small/large routing (docs/adaptive-decoding.md): the large model produces a token only where the small
/// model's next-token entropy is above <see cref="EntropyThreshold"/>.</summary>
public sealed record RoutingOptions
{
    /// <summary>Entropy in nats of the small model's distribution above which the large model takes the token.</summary>
    public float EntropyThreshold { get; init; }

    /// <summary>The second trigger ("speculative thinking"): after the text fed so far ends with this delimiter (e.g. a
    /// blank line, "\n\n"), the large model produces the next <see cref="HandoverTokens"/> tokens whatever the entropy.
    /// Null = off. Needs the tokenizer (<see cref="RoutedSession"/>'s constructor).</summary>
    public string? HandoverDelimiter { get; init; }

    /// <summary>Tokens the large model produces after the delimiter (1..4096 when a delimiter is set).</summary>
    public int HandoverTokens { get; init; }

    public void Validate()
    {
        if (!float.IsFinite(EntropyThreshold) || EntropyThreshold < 0)
        {
            throw new InvalidParameterException("route-entropy", $"{EntropyThreshold} (must be a finite entropy >= 0 nats)");
        }
        if (HandoverDelimiter is not null && (HandoverDelimiter.Length == 0 || HandoverTokens < 1 || HandoverTokens > 4096))
        {
            throw new InvalidParameterException("route-after",
                HandoverDelimiter.Length == 0 ? "the delimiter is empty" : $"hands over for {HandoverTokens} tokens (must be 1..4096)");
        }
        if (HandoverDelimiter is null && HandoverTokens != 0)
        {
            throw new InvalidParameterException("route-tokens", "goes with a delimiter (--route-after)");
        }
    }
}

/// <summary>Which model produced the tokens of one routed generation (complete when its stream has ended).</summary>
public sealed class RoutingStats
{
    /// <summary>Tokens taken from the small model's distribution (EOS included).</summary>
    public int SmallTokens { get; internal set; }

    /// <summary>Tokens taken from the large model's distribution (EOS included).</summary>
    public int LargeTokens { get; internal set; }

    /// <summary>Tokens the large model prefilled to catch up its KV cache (the prompt among them on its first turn).</summary>
    public int CatchUpTokens { get; internal set; }

    /// <summary>Of <see cref="LargeTokens"/>, those handed over by the delimiter trigger (whatever the entropy).</summary>
    public int HandoverTokens { get; internal set; }

    internal void Clear()
    {
        SmallTokens = 0;
        LargeTokens = 0;
        CatchUpTokens = 0;
        HandoverTokens = 0;
    }
}

/// <summary>
/// Two sessions seen as one: every fed token runs through the small model; when the entropy of its next-token
/// distribution is above the threshold, the large model catches its KV cache up on the tokens since its last turn
/// (one prefill, ending with the fed ones) and its distribution is the one handed out. The small model has already
/// consumed every token, so nothing is rolled back. The logits (host path) or the numbers and the chosen token
/// (device path, <see cref="IDeviceSampler"/>) are those of the model the token is taken from, so the generator,
/// token signals and reports describe that distribution. Both models must read the same token ids (the caller
/// checks the tokenizers) and have LM heads of the same width. Owns neither session; allocates once
/// ([capacity] token ids); a step allocates nothing.
/// </summary>
public sealed class RoutedSession : IDecoderSession, IDeviceSampler
{
    private readonly IDecoderSession _small;
    private readonly IDecoderSession _large;
    private readonly RoutingOptions _options;
    private readonly int[] _tokens;   // [capacity] every token fed since Reset
    private readonly float[] _stats = new float[VocabStats.FieldCount];
    private readonly string[] _pieces = [];   // [vocab] each id's text decoded alone (with a handover delimiter)
    private readonly char[] _tail = [];       // the last delimiter-length characters of the text fed
    private int _tailLength;
    private int _handover;                   // tokens left for the large model after a delimiter
    private int _length;

    /// <param name="tokenizer">Needed with a handover delimiter: the text of each fed token is matched against it.</param>
    public RoutedSession(IDecoderSession small, IDecoderSession large, RoutingOptions options, RoutingStats? stats = null, ITextTokenizer? tokenizer = null)
    {
        ArgumentNullException.ThrowIfNull(small);
        ArgumentNullException.ThrowIfNull(large);
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        if (ReferenceEquals(small, large))
        {
            throw new InvalidParameterException("draft-model", "the small and the large model must be two sessions");
        }
        if (small.VocabularySize != large.VocabularySize)
        {
            throw new InvalidParameterException("draft-model",
                $"the small model's LM head has {small.VocabularySize} rows and the large model's {large.VocabularySize}; routing needs equal widths");
        }
        _small = small;
        _large = large;
        _options = options;
        Stats = stats ?? new RoutingStats();
        _tokens = new int[Capacity];
        if (options.HandoverDelimiter is not null)
        {
            if (tokenizer is null)
            {
                throw new ArgumentNullException(nameof(tokenizer), "a handover delimiter needs the tokenizer");
            }
            // Each id's text once, so that a step matches the delimiter without decoding (or allocating).
            _pieces = new string[small.VocabularySize];
            for (int id = 0; id < _pieces.Length; id++)
            {
                try
                {
                    _pieces[id] = tokenizer.Decode([id]);
                }
                catch (Exception error) when (error is not OutOfMemoryException)
                {
                    _pieces[id] = ""; // an LM head's padding row past the tokenizer's vocabulary has no text
                }
            }
            _tail = new char[options.HandoverDelimiter.Length];
        }
        // Sampling on the device works with both sessions there, or neither.
        CanSample = small is IDeviceSampler { CanSample: true } && large is IDeviceSampler { CanSample: true };
    }

    public RoutingStats Stats { get; }

    public int VocabularySize => _small.VocabularySize;

    public int Capacity => Math.Min(_small.Capacity, _large.Capacity);

    public int Length => _length;

    public void Reset()
    {
        _small.Reset();
        _large.Reset();
        _length = 0;
        _tailLength = 0;
        _handover = 0;
        Stats.Clear();
    }

    /// <summary>Last position only: a routed step hands out one distribution, from one of the two models.</summary>
    public void Forward(ReadOnlySpan<int> tokens, Span<float> logits, bool allPositions = false)
    {
        if (allPositions)
        {
            throw new NotSupportedException("a routed session gives the last position's logits only (score each model on its own)");
        }
        int vocabulary = VocabularySize;
        DecoderChecks.Tokens(tokens, _length, Capacity, vocabulary);
        DecoderChecks.Logits(logits.Length, tokens.Length, vocabulary, allPositions: false);
        _small.Forward(tokens, logits);
        Append(tokens);
        VocabStats.ReduceRow(logits[..vocabulary], -1, default, 0, _stats, default, default);
        if (LargeTurn(_stats[(int)VocabStatsField.Entropy]))
        {
            var pending = CatchUp();
            _large.Forward(pending, logits);
            Stats.LargeTokens++;
            return;
        }
        Stats.SmallTokens++;
    }

    public bool CanSample { get; }

    public int ForwardSample(ReadOnlySpan<int> feed, SamplingOptions options, ulong seed, int topK, Span<float> stats, Span<int> topIds,
        Span<float> topLogProbs)
    {
        if (!CanSample)
        {
            throw new InvalidOperationException("routing samples on the device only when both models' sessions do");
        }
        DecoderChecks.Tokens(feed, _length, Capacity, VocabularySize);
        int token = ((IDeviceSampler)_small).ForwardSample(feed, options, seed, topK, stats, topIds, topLogProbs);
        Append(feed);
        if (LargeTurn(stats[(int)VocabStatsField.Entropy]))
        {
            var pending = CatchUp();
            token = ((IDeviceSampler)_large).ForwardSample(pending, options, seed, topK, stats, topIds, topLogProbs);
            Stats.LargeTokens++;
            return token;
        }
        Stats.SmallTokens++;
        return token;
    }

    private void Append(ReadOnlySpan<int> tokens)
    {
        tokens.CopyTo(_tokens.AsSpan(_length));
        _length += tokens.Length;
        if (_tail.Length == 0)
        {
            return;
        }
        foreach (int token in tokens)
        {
            foreach (char c in _pieces[token])
            {
                if (_tailLength == _tail.Length)
                {
                    Array.Copy(_tail, 1, _tail, 0, _tail.Length - 1);
                    _tailLength--;
                }
                _tail[_tailLength++] = c;
            }
        }
        if (_tailLength == _tail.Length && _tail.AsSpan().SequenceEqual(_options.HandoverDelimiter))
        {
            _handover = _options.HandoverTokens;
            _tailLength = 0; // the delimiter triggers once
        }
    }

    /// <summary>Whether the large model takes this step: after a delimiter for HandoverTokens steps, else by entropy.</summary>
    private bool LargeTurn(float entropy)
    {
        if (_handover > 0)
        {
            _handover--;
            Stats.HandoverTokens++;
            return true;
        }
        return entropy > _options.EntropyThreshold;
    }

    /// <summary>The tokens the large model has not seen yet (it is never ahead of the small one).</summary>
    private ReadOnlySpan<int> CatchUp()
    {
        int start = _large.Length;
        Stats.CatchUpTokens += _length - start;
        return _tokens.AsSpan(start, _length - start);
    }

    /// <summary>Owns neither session.</summary>
    public void Dispose()
    {
    }
}
