namespace KernelLM.Tests.Support;

/// <summary>Where the repository's fixtures are, found by walking up from the test binaries to KernelLM.sln.</summary>
public static class TestPaths
{
    private static readonly Lazy<string> s_root = new(() =>
    {
        for (var directory = new DirectoryInfo(AppContext.BaseDirectory); directory is not null; directory = directory.Parent)
        {
            if (File.Exists(Path.Combine(directory.FullName, "KernelLM.sln")))
            {
                return directory.FullName;
            }
        }
        throw new InvalidOperationException($"KernelLM.sln not found above {AppContext.BaseDirectory}");
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
