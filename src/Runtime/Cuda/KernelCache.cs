using System.Buffers.Binary;
using System.Security.Cryptography;
using System.Text;

namespace KernelLM.Runtime.Cuda;

/// <summary>
/// A folder of compiled kernels, keyed by a SHA-256 of everything that went into the compilation (the caller
/// lists the inputs; see <see cref="Key"/>). Entries are written atomically (a temporary file in the same
/// folder, then a rename), and each carries the SHA-256 of its payload: an entry that is truncated or
/// altered is detected on read, deleted and reported as a miss, so the caller recompiles.
/// One folder per compiler (`nvrtc/`, `emulator/`) under <see cref="DefaultRoot"/>.
/// </summary>
public sealed class KernelCache
{
    // Entry layout: magic "KLMK", format (uint32 LE), payload length (int64 LE), SHA-256 of the payload (32 bytes), payload.
    private static ReadOnlySpan<byte> Magic => "KLMK"u8;
    private const uint Format = 1;
    private const int HeaderBytes = 4 + 4 + 8 + 32;
    private const string Extension = ".kbin";

    private long _hits;
    private long _misses;
    private long _corruptEntries;
    private long _writeFailures;

    public KernelCache(string directory)
    {
        ArgumentException.ThrowIfNullOrEmpty(directory);
        Directory = Path.GetFullPath(directory);
    }

    public string Directory { get; }

    public long Hits => Interlocked.Read(ref _hits);
    public long Misses => Interlocked.Read(ref _misses);

    /// <summary>Entries found damaged (and deleted) since this instance was created.</summary>
    public long CorruptEntries => Interlocked.Read(ref _corruptEntries);

    /// <summary>Entries that could not be written (read-only home, full disk): compilation still succeeds.</summary>
    public long WriteFailures => Interlocked.Read(ref _writeFailures);

    public string? LastWriteError { get; private set; }

    /// <summary>`$KERNELLM_CACHE_DIR`, else `$XDG_CACHE_HOME/kernellm`, else `~/.cache/kernellm`.</summary>
    public static string DefaultRoot => RootFrom(Environment.GetEnvironmentVariable);

    /// <summary><see cref="DefaultRoot"/> under a given environment (for tests).</summary>
    public static string RootFrom(Func<string, string?> environment)
    {
        ArgumentNullException.ThrowIfNull(environment);
        string? explicitDirectory = environment("KERNELLM_CACHE_DIR");
        if (!string.IsNullOrEmpty(explicitDirectory))
        {
            return explicitDirectory;
        }
        string? xdg = environment("XDG_CACHE_HOME");
        if (!string.IsNullOrEmpty(xdg) && Path.IsPathRooted(xdg))   // the XDG spec: relative paths are invalid, ignore them
        {
            return Path.Combine(xdg, "kernellm");
        }
        string? home = environment("HOME");
        if (string.IsNullOrEmpty(home))
        {
            home = Environment.GetFolderPath(Environment.SpecialFolder.UserProfile);
        }
        return string.IsNullOrEmpty(home) ? Path.Combine(Path.GetTempPath(), "kernellm-cache") : Path.Combine(home, ".cache", "kernellm");
    }

    /// <summary>The cache for one compiler, in <see cref="DefaultRoot"/>/<paramref name="compiler"/>.</summary>
    public static KernelCache ForCompiler(string compiler) => new(Path.Combine(DefaultRoot, compiler));

    /// <summary>SHA-256 (hex) of the parts, each length-prefixed so that no two lists share a key.</summary>
    public static string Key(IEnumerable<string> parts)
    {
        ArgumentNullException.ThrowIfNull(parts);
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        Span<byte> length = stackalloc byte[8];
        foreach (string part in parts)
        {
            byte[] bytes = Encoding.UTF8.GetBytes(part);
            BinaryPrimitives.WriteInt64LittleEndian(length, bytes.Length);
            hash.AppendData(length);
            hash.AppendData(bytes);
        }
        return Convert.ToHexStringLower(hash.GetHashAndReset());
    }

    public string PathFor(string key) => Path.Combine(Directory, key + Extension);

    /// <summary>The payload stored under the key; false when absent or damaged (a damaged entry is deleted).</summary>
    public bool TryRead(string key, out byte[] payload)
    {
        payload = [];
        string path = PathFor(key);
        byte[] entry;
        try
        {
            entry = File.ReadAllBytes(path);
        }
        catch (Exception error) when (error is IOException or UnauthorizedAccessException)
        {
            // Absent (the usual miss) or unreadable: either way the caller compiles.
            Interlocked.Increment(ref _misses);
            return false;
        }
        if (!TryDecode(entry, out payload))
        {
            Interlocked.Increment(ref _corruptEntries);
            Interlocked.Increment(ref _misses);
            TryDelete(path);
            return false;
        }
        Interlocked.Increment(ref _hits);
        return true;
    }

    /// <summary>Stores the payload atomically; failures to write are counted, not thrown.</summary>
    public void Write(string key, ReadOnlySpan<byte> payload)
    {
        string path = PathFor(key);
        string temporary = $"{path}.{Environment.ProcessId}.{Guid.NewGuid():N}.tmp";
        try
        {
            System.IO.Directory.CreateDirectory(Directory);
            using (var file = new FileStream(temporary, FileMode.CreateNew, FileAccess.Write, FileShare.None))
            {
                Span<byte> header = stackalloc byte[HeaderBytes];
                Magic.CopyTo(header);
                BinaryPrimitives.WriteUInt32LittleEndian(header[4..], Format);
                BinaryPrimitives.WriteInt64LittleEndian(header[8..], payload.Length);
                SHA256.HashData(payload, header[16..]);
                file.Write(header);
                file.Write(payload);
                file.Flush(flushToDisk: true);
            }
            File.Move(temporary, path, overwrite: true);   // rename(2): readers see the old entry or the new one, never half
        }
        catch (Exception error) when (error is IOException or UnauthorizedAccessException)
        {
            Interlocked.Increment(ref _writeFailures);
            LastWriteError = $"{path}: {error.Message}";
            TryDelete(temporary);
        }
    }

    private static bool TryDecode(byte[] entry, out byte[] payload)
    {
        payload = [];
        if (entry.Length < HeaderBytes || !entry.AsSpan(0, 4).SequenceEqual(Magic)
            || BinaryPrimitives.ReadUInt32LittleEndian(entry.AsSpan(4)) != Format
            || BinaryPrimitives.ReadInt64LittleEndian(entry.AsSpan(8)) != entry.Length - HeaderBytes)
        {
            return false;
        }
        var body = entry.AsSpan(HeaderBytes);
        Span<byte> checksum = stackalloc byte[32];
        SHA256.HashData(body, checksum);
        if (!checksum.SequenceEqual(entry.AsSpan(16, 32)))
        {
            return false;
        }
        payload = body.ToArray();
        return true;
    }

    private static void TryDelete(string path)
    {
        try
        {
            File.Delete(path);
        }
        catch (Exception error) when (error is IOException or UnauthorizedAccessException)
        {
            // A damaged entry that cannot be deleted is overwritten by the next successful write.
        }
    }
}
