namespace KernelLM.Runtime.Generation;

/// <summary>
/// A session whose KV cache can be cut back to an earlier length: the fork and rollback of a lookahead
/// (adaptive decoding). Forking is free: remember <see cref="IDecoderSession.Length"/>, run ahead, then
/// <see cref="Truncate"/> back to it. The positions kept are untouched, so the session is then exactly the one a
/// plain run of the kept tokens leaves (the next Forward overwrites the dropped positions), nothing recomputed.
/// </summary>
public interface ISessionRollback
{
    /// <summary>Forgets the positions from <paramref name="length"/> on (0 &lt;= length &lt;= Length); allocates nothing.
    /// On a device that samples, the token history of the repetition penalty and the draw counter go back with it.</summary>
    void Truncate(int length);
}

public static class RollbackChecks
{
    /// <summary>Throws unless 0 &lt;= <paramref name="length"/> &lt;= <paramref name="current"/>.</summary>
    public static void Length(int length, int current)
    {
        if ((uint)length > (uint)current)
        {
            throw new ArgumentOutOfRangeException(nameof(length), length, $"truncate: the length must be in 0..{current} (the tokens in the cache)");
        }
    }
}
