using System.Diagnostics;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Cli;

/// <summary>The README's commands are true: the run command works as written, and CI runs the test command.</summary>
[TestFixture]
public sealed class ReadmeTests
{
    private static string CommandAfter(string marker)
    {
        var lines = File.ReadAllLines(Path.Combine(TestPaths.RepositoryRoot, "README.md"));
        int at = Array.FindIndex(lines, line => line.Trim() == marker);
        Assert.That(at, Is.GreaterThanOrEqualTo(0), $"README.md has no {marker}");
        Assert.That(lines[at + 1], Does.StartWith("```"));
        Assert.That(lines[at + 3], Does.StartWith("```"), "one command per block");
        return lines[at + 2].Trim();
    }

    [Test]
    public void Run_command_generates_a_story_and_reports_tokens_per_second()
    {
        string command = CommandAfter("<!-- run-command -->");
        Assert.That(command, Does.Contain(" run"));
        var start = new ProcessStartInfo("bash", ["-c", command])
        {
            WorkingDirectory = TestPaths.RepositoryRoot,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        // Keep the nested build from leaving build servers behind (they would outlive the test run).
        start.Environment["MSBUILDDISABLENODEREUSE"] = "1";
        start.Environment["DOTNET_CLI_USE_MSBUILD_SERVER"] = "0";
        start.Environment["UseSharedCompilation"] = "false";
        using var process = Process.Start(start)!;
        var output = process.StandardOutput.ReadToEndAsync();
        var errors = process.StandardError.ReadToEndAsync();
        Assert.That(process.WaitForExit(TimeSpan.FromMinutes(5)), Is.True, "the run command finished within 5 minutes");
        Assert.That(process.ExitCode, Is.Zero, errors.Result + output.Result);
        Assert.That(output.Result, Does.StartWith("Once upon a time"));
        Assert.That(output.Result, Does.Match(@"decode \d+(\.\d+)? tokens/s"));
    }

    [Test]
    public void Ci_runs_the_readme_test_command()
    {
        string command = CommandAfter("<!-- test-command -->");
        Assert.That(command, Does.Contain("dotnet cake").Or.Contain("dotnet test"));
        string ci = File.ReadAllText(Path.Combine(TestPaths.RepositoryRoot, ".ci", "run"));
        Assert.That(ci, Does.Contain("<!-- test-command -->"), ".ci/run reads the test command from README.md");
        Assert.That(ci, Does.Contain("passed, $failed failed, $skipped skipped"));
    }
}
