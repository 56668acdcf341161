namespace KernelLM.Runtime.Generation;

/// <summary>
/// Watches streamed text for stop strings. Text that could still be the start of a stop string is held
/// back, so what has been released never contains (part of) a stop string.
/// </summary>
public sealed class StopStringMatcher
{
    private readonly string[] _stops;
    private readonly System.Text.StringBuilder _pending = new();

    public StopStringMatcher(IReadOnlyList<string> stops)
    {
        foreach (string stop in stops)
        {
            if (string.IsNullOrEmpty(stop))
            {
                throw new InvalidParameterException("stop", "stop strings must not be empty");
            }
        }
        _stops = [.. stops];
    }

    public bool Stopped { get; private set; }

    /// <summary>Adds a piece of text; returns what can be released now. After a stop string is seen,
    /// returns the text before it and sets <see cref="Stopped"/>.</summary>
    public string Push(string piece)
    {
        if (Stopped)
        {
            return string.Empty;
        }
        if (_stops.Length == 0)
        {
            return piece;
        }
        _pending.Append(piece);
        string text = _pending.ToString();
        int earliest = -1;
        foreach (string stop in _stops)
        {
            int at = text.IndexOf(stop, StringComparison.Ordinal);
            if (at >= 0 && (earliest < 0 || at < earliest))
            {
                earliest = at;
            }
        }
        if (earliest >= 0)
        {
            Stopped = true;
            _pending.Clear();
            return text[..earliest];
        }
        int hold = 0;
        foreach (string stop in _stops)
        {
            for (int length = Math.Min(stop.Length - 1, text.Length); length > hold; length--)
            {
                if (text.AsSpan(text.Length - length).SequenceEqual(stop.AsSpan(0, length)))
                {
                    hold = length;
                    break;
                }
            }
        }
        _pending.Clear();
        _pending.Append(text, text.Length - hold, hold);
        return text[..^hold];
    }

    /// <summary>Releases held-back text at the end of generation (no stop string completed).</summary>
    public string Flush()
    {
        string text = _pending.ToString();
        _pending.Clear();
        return Stopped ? string.Empty : text;
    }
}
