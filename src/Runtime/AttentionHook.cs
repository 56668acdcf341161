namespace KernelLM.Runtime;

/// <summary>
/// Optional changes to what attention sees, for one sequence (docs/conventions.md, "Attention hook"); the CUDA
/// device takes the same things as device tensors (<c>Cuda.Ops.DeviceAttentionHook</c>). The default
/// value changes nothing and costs nothing.
/// <list type="bullet">
/// <item><see cref="KeyBias"/>: [heads, capacity] fp32 added to the scaled score of (head, key position) before the
/// softmax (attention steering); -inf masks the key.</item>
/// <item><see cref="SelectedPositions"/>: strictly ascending cache positions, shared by every head (TokenSelect).
/// Queries at positions start.. attend to the listed positions below start plus the chunk's own positions
/// causally; listed positions at or after start are ignored. The sliding window still applies. Setting it,
/// even to an empty list, turns selection on; a decode step (one query) must list its own position to match
/// the CUDA decode kernel, which attends to listed positions only.</item>
/// <item><see cref="RopeCos"/> / <see cref="RopeSin"/>: compacted RoPE (TokenSelect's compacted position mode), the
/// model's RoPE tables [positions, head_dim / 2]. The cache holds keys before RoPE and q is unrotated; each key is
/// rotated by its slot (the index of its position in the list for the listed prefix; m + t for chunk token t, m the
/// listed positions below start; without a list the position itself) and query t by m + t, with the tables' rows.</item>
/// </list>
/// A query that sees no key at all (everything masked) gets zeros.
/// </summary>
public readonly ref struct AttentionHook
{
    private readonly ReadOnlySpan<int> _selected;
    private readonly bool _selects;

    /// <summary>[heads, capacity] fp32, or empty for no bias.</summary>
    public ReadOnlySpan<float> KeyBias { get; init; }

    /// <summary>Strictly ascending cache positions the prefix is restricted to; see the type's summary.</summary>
    public ReadOnlySpan<int> SelectedPositions
    {
        get => _selected;
        init
        {
            _selected = value;
            _selects = true;
        }
    }

    /// <summary>Whether <see cref="SelectedPositions"/> was set (an empty list selects no prefix position).</summary>
    public bool SelectsPositions => _selects;

    /// <summary>cos of the model's RoPE table [positions, head_dim / 2]: set (with <see cref="RopeSin"/>) for compacted RoPE.</summary>
    public ReadOnlySpan<float> RopeCos { get; init; }

    /// <summary>sin of the model's RoPE table [positions, head_dim / 2], given with <see cref="RopeCos"/>.</summary>
    public ReadOnlySpan<float> RopeSin { get; init; }

    /// <summary>Whether attention applies compacted RoPE (<see cref="RopeCos"/> set).</summary>
    public bool CompactedRope => !RopeCos.IsEmpty;

    public bool IsEmpty => KeyBias.IsEmpty && !_selects && !CompactedRope;
}
