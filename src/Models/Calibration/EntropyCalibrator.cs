using KernelLM.Models.Scoring;
using KernelLM.Runtime;
using KernelLM.Runtime.Generation;

namespace KernelLM.Models.Calibration;

/// <summary>
/// The data for the adaptive-decoding threshold (<see cref="EntropyCalibration"/>): reference texts teacher-forced
/// through the model with the <see cref="Scorer"/> (one fused vocabulary reduction per position, on the model's
/// device), each position labelled by whether its reference token is the model's top-1.
/// </summary>
public static class EntropyCalibrator
{
    /// <summary>Steps of every text in order; a text longer than the context is cut to the context (calibration needs
    /// steps, not whole texts). <paramref name="onText"/> (optional) sees each text's index and step count.</summary>
    public static List<CalibrationStep> CollectSteps(LanguageModel model, IEnumerable<string> texts, Action<int, int>? onText = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(texts);
        var steps = new List<CalibrationStep>();
        using var scorer = new Scorer(model, reference: null, topK: 1);
        int index = 0;
        foreach (string text in texts)
        {
            int[] ids = model.Encode(text);
            if (ids.Length > scorer.Capacity)
            {
                ids = ids[..scorer.Capacity];
            }
            if (ids.Length < 2)
            {
                throw new InvalidParameterException("text", $"text {index + 1} encodes to {ids.Length} token(s); calibration needs at least 2");
            }
            var score = scorer.Score(ids);
            foreach (var position in score.Positions)
            {
                steps.Add(new CalibrationStep(position.Entropy, position.Top.Count > 0 && position.Top[0].Id == position.Token));
            }
            onText?.Invoke(index, score.Positions.Count);
            index++;
        }
        return steps;
    }

    /// <summary>Collects the steps of <paramref name="texts"/> and fits the threshold (not saved).</summary>
    public static EntropyThreshold Calibrate(LanguageModel model, IReadOnlyList<string> texts)
    {
        ArgumentNullException.ThrowIfNull(texts);
        var steps = CollectSteps(model, texts);
        return EntropyCalibration.Calibrate(steps, texts.Count, Path.GetFileName(Path.TrimEndingDirectorySeparator(Path.GetFullPath(model.Directory))));
    }
}
