using System.Numerics.Tensors;

namespace KernelLM.Runtime.Sampling;

/// <summary>
/// Picks the next token from a row of logits. All scratch is allocated once for the vocabulary size, so
/// sampling allocates nothing per token. The random number is an argument (a uniform draw in [0, 1)),
/// which makes every path testable without a generator.
/// </summary>
public sealed class Sampler
{
    private readonly float[] _work;
    private readonly float[] _keys;
    private readonly int[] _indices;
    private readonly int[] _seen;
    private int _stamp;

    public Sampler(int vocabularySize)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(vocabularySize, 1);
        VocabularySize = vocabularySize;
        _work = new float[vocabularySize];
        _keys = new float[vocabularySize];
        _indices = new int[vocabularySize];
        _seen = new int[vocabularySize];
    }

    public int VocabularySize { get; }

    /// <summary>log sum_i exp(logits_i), max-shifted, accumulated in fp64.</summary>
    public static double LogSumExp(ReadOnlySpan<float> logits)
    {
        float max = TensorPrimitives.Max(logits);
        if (float.IsNegativeInfinity(max))
        {
            return double.NegativeInfinity;
        }
        double sum = 0;
        foreach (float logit in logits)
        {
            sum += Math.Exp(logit - max);
        }
        return max + Math.Log(sum);
    }

    /// <summary>
    /// Chooses a token from <paramref name="logits"/> ([vocabulary], left unchanged: the penalty and
    /// temperature are applied to a copy). <paramref name="history"/>: the tokens so far (for the repetition penalty). <paramref name="uniform"/>:
    /// a draw in [0, 1), ignored when greedy. Returns the token id.
    /// </summary>
    public int Sample(ReadOnlySpan<float> rawLogits, SamplingOptions options, ReadOnlySpan<int> history, double uniform)
    {
        if (rawLogits.Length != VocabularySize)
        {
            throw new ArgumentException($"logits hold {rawLogits.Length} values, the sampler was built for {VocabularySize}", nameof(rawLogits));
        }
        var logits = _work.AsSpan();
        rawLogits.CopyTo(logits);
        if (options.RepetitionPenalty != 1f)
        {
            ApplyRepetitionPenalty(logits, history, options.RepetitionPenalty);
        }
        if (options.IsGreedy)
        {
            return TensorPrimitives.IndexOfMax(logits);
        }

        TensorPrimitives.Divide(logits, options.Temperature, logits);
        int count = SelectCandidates(logits, options);
        var keys = _keys.AsSpan(0, count);
        var indices = _indices.AsSpan(0, count);

        // keys hold the candidates' logits, sorted descending; turn them into probabilities.
        float max = keys[0];
        TensorPrimitives.Subtract(keys, max, keys);
        TensorPrimitives.Exp(keys, keys);
        float total = TensorPrimitives.Sum(keys);

        if (options.TopP < 1f)
        {
            double cumulative = 0;
            int keep = count;
            for (int i = 0; i < count; i++)
            {
                cumulative += keys[i] / total;
                if (cumulative >= options.TopP)
                {
                    keep = i + 1;
                    break;
                }
            }
            count = keep;
        }
        if (options.MinP > 0f)
        {
            // keys[0] is the largest probability; sorted, so the survivors are a prefix.
            float threshold = options.MinP * keys[0];
            int keep = 1;
            while (keep < count && keys[keep] >= threshold)
            {
                keep++;
            }
            count = keep;
        }

        float kept = TensorPrimitives.Sum(_keys.AsSpan(0, count));
        double target = uniform * kept;
        double running = 0;
        for (int i = 0; i < count; i++)
        {
            running += _keys[i];
            if (target < running)
            {
                return _indices[i];
            }
        }
        return _indices[count - 1];
    }

    /// <summary>Fills _keys/_indices with the candidate logits sorted descending (top-k of them when set).</summary>
    private int SelectCandidates(ReadOnlySpan<float> logits, SamplingOptions options)
    {
        int vocabulary = logits.Length;
        int k = options.TopK > 0 ? Math.Min(options.TopK, vocabulary) : vocabulary;
        bool needsOrder = k < vocabulary || options.TopP < 1f || options.MinP > 0f;
        if (!needsOrder)
        {
            logits.CopyTo(_keys);
            for (int i = 0; i < vocabulary; i++)
            {
                _indices[i] = i;
            }
            // Unsorted is fine for a plain draw, but keys[0] must be the maximum for the softmax shift.
            int best = TensorPrimitives.IndexOfMax(logits);
            (_keys[0], _keys[best]) = (_keys[best], _keys[0]);
            (_indices[0], _indices[best]) = (_indices[best], _indices[0]);
            return vocabulary;
        }
        // Negated keys sort ascending = logits descending; ties keep a deterministic order by index.
        for (int i = 0; i < vocabulary; i++)
        {
            _keys[i] = -logits[i];
            _indices[i] = i;
        }
        if (k < vocabulary)
        {
            Select(_keys, _indices, 0, vocabulary - 1, k);
        }
        var keys = _keys.AsSpan(0, k);
        keys.Sort(_indices.AsSpan(0, k));
        TensorPrimitives.Negate(keys, keys);
        return k;
    }

    /// <summary>Quickselect: afterwards keys[0..k) hold the k smallest keys (in any order).</summary>
    private static void Select(float[] keys, int[] indices, int left, int right, int k)
    {
        while (left < right)
        {
            float pivot = keys[left + ((right - left) >> 1)];
            int i = left;
            int j = right;
            while (i <= j)
            {
                while (keys[i] < pivot)
                {
                    i++;
                }
                while (keys[j] > pivot)
                {
                    j--;
                }
                if (i <= j)
                {
                    (keys[i], keys[j]) = (keys[j], keys[i]);
                    (indices[i], indices[j]) = (indices[j], indices[i]);
                    i++;
                    j--;
                }
            }
            if (k - 1 <= j)
            {
                right = j;
            }
            else if (k - 1 >= i)
            {
                left = i;
            }
            else
            {
                return;
            }
        }
    }

    private void ApplyRepetitionPenalty(Span<float> logits, ReadOnlySpan<int> history, float penalty)
    {
        int stamp = ++_stamp;
        foreach (int token in history)
        {
            if ((uint)token >= (uint)logits.Length || _seen[token] == stamp)
            {
                continue;
            }
            _seen[token] = stamp;
            float logit = logits[token];
            logits[token] = logit > 0 ? logit / penalty : logit * penalty;
        }
    }
}
