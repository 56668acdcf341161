using System.Diagnostics;

namespace KernelLM.Tests.Support;

/// <summary>
/// Headless Chromium for the tests that render HTML in a real browser (Debian's `chromium`; `bash .ci/run` installs
/// it). KERNELLM_CHROMIUM names another executable. Each call gets its own profile folder, so parallel runs and a
/// developer's own browser do not interfere.
/// </summary>
public static class Chromium
{
    private static readonly Lazy<string?> s_executable = new(() =>
    {
        string? configured = Environment.GetEnvironmentVariable("KERNELLM_CHROMIUM");
        if (!string.IsNullOrEmpty(configured))
        {
            return File.Exists(configured) ? configured : null;
        }
        foreach (string folder in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries))
        {
            foreach (string name in new[] { "chromium", "chromium-browser", "google-chrome" })
            {
                string candidate = Path.Combine(folder, name);
                if (File.Exists(candidate))
                {
                    return candidate;
                }
            }
        }
        return null;
    });

    /// <summary>The executable, or Assert.Ignore with the reason (the test is reported as skipped, never passed).</summary>
    public static string RequireExecutable()
    {
        if (s_executable.Value is null)
        {
            Assert.Ignore("headless Chromium is not installed (Debian: apt-get install chromium; or set KERNELLM_CHROMIUM): the browser rendering test cannot run");
        }
        return s_executable.Value!;
    }

    /// <summary>The DOM after the page's scripts ran (--dump-dom); <paramref name="fragment"/> is appended to the URL.</summary>
    public static string DumpDom(string htmlPath, string fragment = "") => Run(htmlPath, fragment, "--dump-dom", "").Output;

    /// <summary>A PNG screenshot of the page at the given window size.</summary>
    public static byte[] Screenshot(string htmlPath, int width, int height, string fragment = "")
    {
        string png = Path.Combine(Path.GetDirectoryName(htmlPath)!, $"screenshot-{Guid.NewGuid():N}.png");
        var (_, errors) = Run(htmlPath, fragment, $"--screenshot={png}", $"--window-size={width},{height}");
        Assert.That(File.Exists(png), Is.True, $"chromium wrote no screenshot: {errors}");
        return File.ReadAllBytes(png);
    }

    private static (string Output, string Errors) Run(string htmlPath, string fragment, string action, string size)
    {
        string executable = RequireExecutable();
        string profile = TestPaths.NewTemporaryDirectory("chromium-profile");
        try
        {
            var start = new ProcessStartInfo(executable)
            {
                RedirectStandardOutput = true,
                RedirectStandardError = true,
            };
            // --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
            foreach (string argument in new[] { "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                "--disable-extensions", $"--user-data-dir={profile}", action, size, new Uri(Path.GetFullPath(htmlPath)).AbsoluteUri + fragment })
            {
                if (argument.Length > 0)
                {
                    start.ArgumentList.Add(argument);
                }
            }
            using var process = Process.Start(start)!;
            var output = process.StandardOutput.ReadToEndAsync();
            var errors = process.StandardError.ReadToEndAsync();
            if (!process.WaitForExit(TimeSpan.FromSeconds(90)))
            {
                process.Kill(entireProcessTree: true);
                Assert.Fail($"chromium did not finish within 90 s: {errors.Result}");
            }
            Assert.That(process.ExitCode, Is.Zero, $"chromium exited with {process.ExitCode}: {errors.Result}");
            return (output.Result, errors.Result);
        }
        finally
        {
            try
            {
                Directory.Delete(profile, recursive: true);
            }
            catch (IOException)
            {
                // Chromium's helper processes may still hold a file for a moment; the folder is in the temp dir.
            }
        }
    }
}
