namespace KernelLM.Tests.Support;

/// <summary>Where the repository's fixtures are, found by walking up from the test binaries to KernelLM.sln.</summary>
public static class TestPaths
{
    /// <summary>KERNELLM_REPOSITORY_ROOT, else the first folder holding KernelLM.sln above the test binaries or the
    /// working directory (the self-contained suite on the GPU machine runs extracted to a temporary folder).</summary>
    private static readonly Lazy<string> s_root = new(() =>
    {
        string? configured = Environment.GetEnvironmentVariable("KERNELLM_REPOSITORY_ROOT");
        if (!string.IsNullOrEmpty(configured))
        {
            return Path.GetFullPath(configured);
        }
        foreach (string start in new[] { AppContext.BaseDirectory, Environment.CurrentDirectory })
        {
            for (var directory = new DirectoryInfo(start); directory is not null; directory = directory.Parent)
            {
                if (File.Exists(Path.Combine(directory.FullName, "KernelLM.sln")))
                {
                    return directory.FullName;
                }
            }
        }
        throw new InvalidOperationException($"KernelLM.sln not found above {AppContext.BaseDirectory} or {Environment.CurrentDirectory}; set KERNELLM_REPOSITORY_ROOT");
    });

    public static string RepositoryRoot => s_root.Value;

    public static string TinyStories => Path.Combine(RepositoryRoot, "models", "tiny-stories");

    public static string NpmFixtures => Path.Combine(RepositoryRoot, "tests", "fixtures", "npm");

    /// <summary>A fresh temporary folder, deleted by the caller (or left for inspection on failure).</summary>
    public static string NewTemporaryDirectory(string prefix)
    {
        string path = Path.Combine(Path.GetTempPath(), $"kernellm-{prefix}-{Guid.NewGuid():N}");
        Directory.CreateDirectory(path);
        return path;
    }
}
